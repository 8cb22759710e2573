"""The edge runtime and calibration must work on a box without torch."""

import pkgutil
import subprocess
import sys

BLOCK_TORCH = """
import sys
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is not installed on this edge box")
sys.meta_path.insert(0, NoTorch())
"""


def test_runtime_and_calibration_import_without_torch():
    import edgeinspect.calibration
    import edgeinspect.runtime

    modules = [info.name for package in (edgeinspect.runtime, edgeinspect.calibration)
               for info in pkgutil.walk_packages(package.__path__, f"{package.__name__}.")]
    assert len(modules) >= 28 and "edgeinspect.runtime.outputs.live_view" in modules
    code = BLOCK_TORCH + "".join(f"import {m}\n" for m in modules) + "assert 'torch' not in sys.modules\n"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_torch_block_really_blocks():
    result = subprocess.run([sys.executable, "-c", BLOCK_TORCH + "import edgeinspect.train.run"],
                            capture_output=True, text=True)
    assert result.returncode != 0 and "torch is not installed" in result.stderr
