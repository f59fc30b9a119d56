"""The ``revify`` command line.

``revify demo`` converts a small built-in BERT-shaped model and prints the
measured memory report; ``revify inspect`` prints the plan for it. Exit
codes: 0 ok, 1 conversion error, 2 usage or input error.
"""
from __future__ import annotations

import argparse
import sys
import time

EXAMPLES = """examples:
  revify demo                          convert a built-in 6-layer BERT-shaped model, print the report
  revify demo --layers 12 --hidden 768 BERT-base shape (slower)
  revify inspect                       show blocks, chains and decisions for the built-in model
"""


def _demo_model(layers: int, hidden: int, seq_len: int, batch: int):
    import torch

    try:
        from transformers import BertConfig, BertForSequenceClassification
    except ImportError as exc:  # transformers is in the [test] extra
        raise SystemExit(f"revify: error: the demo needs transformers ({exc}); "
                         "install with pip install -e '.[test]'") from None
    torch.manual_seed(0)
    heads = max(1, hidden // 64)
    config = BertConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=4 * hidden, vocab_size=30522, max_position_embeddings=max(512, seq_len))
    model = BertForSequenceClassification(config).train()
    inputs = {"input_ids": torch.randint(0, config.vocab_size, (batch, seq_len)),
              "attention_mask": torch.ones(batch, seq_len, dtype=torch.long)}
    return model, inputs


def _cmd_demo(args) -> int:
    import revify

    model, inputs = _demo_model(args.layers, args.hidden, args.seq_len, args.batch_size)
    print(f"revify demo: BERT-shaped model, {args.layers} layers, hidden {args.hidden}, "
          f"batch {args.batch_size}, seq {args.seq_len} (random weights, CPU)", flush=True)
    t0 = time.perf_counter()
    rmodel = revify.revify(model, inputs, strategy="checkpoint")
    print(f"converted in {time.perf_counter() - t0:.1f} s; measuring one training step before and after ...",
          flush=True)
    print(revify.report(model, rmodel, inputs, repeats=args.repeats))
    return 0 if rmodel.revify_plan.converted else 1


def _cmd_inspect(args) -> int:
    import revify

    model, inputs = _demo_model(args.layers, args.hidden, args.seq_len, args.batch_size)
    plan = revify.inspect(model, inputs)
    return 0 if plan.converted else 1


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="revify", description="Make PyTorch training fit in less activation memory.",
                                epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for name, helptext in (("demo", "convert a built-in BERT-shaped model and print the memory report"),
                           ("inspect", "print blocks, chains and decisions for the built-in model")):
        s = sub.add_parser(name, help=helptext, description=helptext, epilog=EXAMPLES,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        s.add_argument("--layers", type=int, default=6)
        s.add_argument("--hidden", type=int, default=256)
        s.add_argument("--batch-size", type=int, default=4)
        s.add_argument("--seq-len", type=int, default=128)
        if name == "demo":
            s.add_argument("--repeats", type=int, default=3, help="timed steps per model (median)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    for value, flag in ((args.layers, "--layers"), (args.hidden, "--hidden"),
                        (args.batch_size, "--batch-size"), (args.seq_len, "--seq-len")):
        if value <= 0:
            print(f"revify: error: {flag} must be positive, got {value}", file=sys.stderr)
            return 2
    handler = {"demo": _cmd_demo, "inspect": _cmd_inspect}[args.command]
    return handler(args)


if __name__ == "__main__":
    sys.exit(main())
