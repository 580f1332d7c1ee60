"""`import l2a` and a CPU forward work on a machine without triton."""

import subprocess
import sys

SCRIPT = """
import sys
sys.modules["triton"] = None  # makes `import triton` raise ImportError
import torch, transformers, l2a
from l2a.ops import conditional_attention
cfg = transformers.Qwen3Config(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                               num_attention_heads=2, num_key_value_heads=1, head_dim=16)
model = l2a.convert_model(transformers.Qwen3ForCausalLM(cfg), sliding_window=4)
out = model(input_ids=torch.randint(0, 300, (1, 10)))
assert out.logits.shape == (1, 10, 300)
q = torch.randn(1, 5, 2, 16)
try:
    conditional_attention(q, q, q, torch.ones(1, 5, dtype=torch.bool), backend="triton")
except ImportError as e:
    assert "triton" in str(e)
else:
    raise AssertionError("backend='triton' without triton must raise ImportError")
print("ok")
"""


def test_import_and_forward_without_triton():
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("ok")


LAYERS_FIRST = """
import warnings
warnings.simplefilter("error")  # the registration warning would fail the run
from l2a.layers import Router  # the first import of l2a and (through the layers) of transformers
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
assert "l2a" in CONFIG_MAPPING, "L2A not registered with the Auto classes"
print("ok")
"""


def test_importing_the_layers_first_registers_the_models():
    """`l2a.layers` imports transformers itself; the registration that import triggers needs the finished
    `l2a.layers` and must still happen (it used to fail with a circular-import warning)."""
    result = subprocess.run([sys.executable, "-c", LAYERS_FIRST], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("ok")
