import subprocess
import sys


def test_search_core_imports_no_ray_vllm_pyarrow_or_pydantic():
    code = ("import sys, search; "
            "print(sorted(m for m in ('ray', 'vllm', 'pyarrow', 'pydantic', 'torch', 'transformers') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
