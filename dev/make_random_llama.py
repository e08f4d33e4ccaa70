#!/usr/bin/env python3
"""Writes a random Llama checkpoint of a real shape (bf16 safetensors shards, as
transformers saves them) for load and speed tests; the weights are made on the GPU.
PyTorch and transformers are references here, never part of spear.
  make_random_llama.py llama-2-7b|llama-3.2-1b OUT_DIR TOKENIZER_JSON"""
import shutil, sys, torch, transformers

name, out, tok = sys.argv[1:4]
shapes = {
    "llama-2-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                       tie_word_embeddings=False),
    "llama-3.2-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                         tie_word_embeddings=True, rope_theta=500000.0,
                         rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
}
cfg = transformers.LlamaConfig(rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, **shapes[name])
torch.manual_seed(0)
with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
    m = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
m.save_pretrained(out, max_shard_size="5GB", safe_serialization=True)
shutil.copy(tok, out + "/tokenizer.json")
print("wrote", out)
