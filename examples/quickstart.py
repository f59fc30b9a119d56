"""Convert a small Llama-shaped model with revify and print the plan and the measured report.

    python examples/quickstart.py
"""
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import revify

torch.manual_seed(0)
config = LlamaConfig(hidden_size=256, num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=4,
                     intermediate_size=688, vocab_size=1000)  # use_cache=True by default: revify turns the
# KV cache off for training calls (as Hugging Face's gradient checkpointing does); generate() keeps it
model = LlamaForCausalLM(config).train()
inputs = {"input_ids": torch.randint(0, 1000, (4, 128))}

rmodel = revify.revify(model, inputs, strategy="checkpoint")
print(revify.report(model, rmodel, inputs))

# rmodel is a drop-in: same outputs, same state_dict keys, the same parameter tensors
optimizer = torch.optim.AdamW(rmodel.parameters(), lr=1e-4)
loss = rmodel(**inputs, labels=inputs["input_ids"]).loss
loss.backward()
optimizer.step()
print(f"one training step done, loss {loss.item():.3f}")
