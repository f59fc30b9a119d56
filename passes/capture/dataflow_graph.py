"""Pass 2: an fx graph as a networkx DiGraph of data dependencies.

Before::

    x -> linear -> relu -> add(x, relu) -> output     (torch.fx.Graph)

After::

    DiGraph edges: x→linear, linear→relu, relu→add, x→add, add→output

Edges point from producer to user. Nodes are the fx nodes themselves, so the
result of every networkx algorithm maps straight back to the graph.
"""
from __future__ import annotations

import networkx as nx
import torch.fx as fx


def dataflow_graph(graph: fx.Graph) -> nx.DiGraph:
    g = nx.DiGraph()
    for node in graph.nodes:
        g.add_node(node)
        for inp in node.all_input_nodes:
            g.add_edge(inp, node)
    return g


def hidden_subgraph(g: nx.DiGraph, entry: fx.Node) -> nx.DiGraph:
    """The part of the graph that depends on ``entry`` (the hidden state)."""
    return g.subgraph(nx.descendants(g, entry) | {entry})
