"""A tiny Hugging Face Llama for the checkpoint tests, in a process of its own so that the test process
never imports torch and transformers (python tests/hf_tiny.py make DIR SEED | compare ORIG BACK...); make also writes a tiny GPT-2 to DIR-gpt2."""
import os
import sys

import numpy as np
import torch
import transformers


def make(path, seed):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=80, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, attention_bias=True, mlp_bias=True,
                                   tie_word_embeddings=False, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.save_pretrained(path, max_shard_size="40KB")  # numbered files + model.safetensors.index.json
    ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(seed))
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(seed + 1))
    with torch.no_grad():
        np.savez(os.path.join(path, "ref.npz"), ids=ids.numpy(), logits=model(ids).logits.numpy(), x=x.numpy(),
                 mlp=model.model.layers[1].mlp(x).numpy())


def make_gpt2(path, seed):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=96, n_positions=32, n_embd=32, n_layer=2, n_head=4)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    model.save_pretrained(path, max_shard_size="40KB")
    ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        np.savez(os.path.join(path, "ref.npz"), ids=ids.numpy(), logits=model(ids).logits.numpy())


def compare(orig_path, back_path):
    """transformers loads the tplinear checkpoint: every tensor and the logits equal the original's."""
    orig = transformers.LlamaForCausalLM.from_pretrained(orig_path).eval()
    back = transformers.LlamaForCausalLM.from_pretrained(back_path).eval()
    a, b = orig.state_dict(), back.state_dict()
    assert sorted(a) == sorted(b), (sorted(a), sorted(b))
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ref = np.load(os.path.join(orig_path, "ref.npz"))
    with torch.no_grad():
        assert np.array_equal(back(torch.from_numpy(ref["ids"])).logits.numpy(), ref["logits"])
    print("transformers loads it: every tensor and the logits are equal")


if __name__ == "__main__":
    if sys.argv[1] == "make":
        make(sys.argv[2], int(sys.argv[3]))
        make_gpt2(sys.argv[2] + "-gpt2", int(sys.argv[3]))
    else:
        for back in sys.argv[3:]:
            compare(sys.argv[2], back)
