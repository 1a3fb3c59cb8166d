"""The copy promise: each module works when copied alone into an empty folder.

buddy_pool.py and maxsim_loss.py need torch only; model_utils.py needs torch, timm and pillow. Each test
copies one file into an empty temporary folder and runs a fresh interpreter there, with the project
root scrubbed from sys.path and an import blocker (a sys.meta_path finder installed before anything
else is imported) that refuses the other project modules and the packages the file must not need.
A static check (AST) of each file's imports backs this up, including imports inside functions that a
short run might not reach.
"""
import ast
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.realpath(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROJECT_MODULES = {"buddy_pool", "maxsim_loss", "model_utils", "train"}

# Runs first in the child: install the blocker, drop the project root from sys.path, then the test body.
# argv[1]: comma-separated blocked top-level names; argv[2]: the project root.
PRELUDE = textwrap.dedent("""
    import os, sys
    BLOCKED = set(sys.argv[1].split(","))

    class _Blocker:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError("copy-promise test: import of %r is blocked" % name, name=name)
            return None

    sys.meta_path.insert(0, _Blocker())
    sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.getcwd()) != sys.argv[2]]

    def check_isolation(module):
        here = os.path.realpath(os.getcwd())
        assert os.path.realpath(os.path.dirname(module.__file__)) == here, module.__file__
        leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
        assert not leaked, leaked
        for name in BLOCKED:            # the blocker really blocks (so the checks above mean something)
            try:
                __import__(name)
            except ModuleNotFoundError:
                pass
            else:
                raise AssertionError("blocker let %s through" % name)
""")


def run_alone(tmp_path, filename, blocked, body):
    """Copy ROOT/filename alone into tmp_path and run PRELUDE + body there in a fresh interpreter."""
    shutil.copy(os.path.join(ROOT, filename), tmp_path / filename)
    assert sorted(os.listdir(tmp_path)) == [filename]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP", "PYTHONHOME")}
    env["HF_HUB_OFFLINE"] = "1"
    proc = subprocess.run(
        [sys.executable, "-c", PRELUDE + textwrap.dedent(body), ",".join(sorted(blocked)), ROOT],
        cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert proc.stdout.strip().endswith("OK"), proc.stdout
    return proc


def top_level_imports(filename):
    """Top-level package names of every import statement in the file (at any depth), and relative ones."""
    with open(os.path.join(ROOT, filename), encoding="utf-8") as f:
        tree = ast.parse(f.read(), filename)
    names, relative = set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                relative.append(node.module)
            else:
                names.add(node.module.split(".")[0])
    return names, relative


def stdlib_names():
    names = getattr(sys, "stdlib_module_names", None)  # Python >= 3.10
    if names is None:
        pytest.skip("sys.stdlib_module_names needs Python >= 3.10")
    return set(names)


# ---------------------------------------------------------------------------------------- static checks

@pytest.mark.parametrize("filename,allowed", [
    ("buddy_pool.py", {"torch"}),
    ("maxsim_loss.py", {"torch"}),
    # huggingface_hub and safetensors are timm's own dependencies: installing timm installs them.
    ("model_utils.py", {"torch", "timm", "PIL", "huggingface_hub", "safetensors"}),
])
def test_imports_are_only_the_promised_packages(filename, allowed):
    names, relative = top_level_imports(filename)
    assert not relative, f"{filename}: relative imports {relative}"
    assert not names & PROJECT_MODULES, f"{filename} imports project modules {names & PROJECT_MODULES}"
    third_party = names - stdlib_names()
    assert third_party <= allowed, f"{filename} imports {sorted(third_party - allowed)}"
    assert "torch" in names


# ----------------------------------------------------------------------------------------- live checks

# numpy, PIL, torchvision, timm and the other project modules are all blocked: torch itself tolerates a
# missing numpy (it warns "Failed to initialize NumPy" and carries on).
TORCH_ONLY_BLOCKED = (PROJECT_MODULES | {"numpy", "PIL", "timm", "torchvision"})


def test_buddy_pool_works_copied_alone(tmp_path):
    run_alone(tmp_path, "buddy_pool.py", TORCH_ONLY_BLOCKED - {"buddy_pool"}, """
        import torch
        import buddy_pool
        torch.manual_seed(0)
        pool = buddy_pool.BuddyPool(8, kernel_size=3)
        cue = torch.randn(2, 5, 8)
        patches = torch.randn(2, 3, 4, 8, requires_grad=True)
        out = pool(cue, patches)
        assert out.shape == (2, 5, 8), out.shape
        assert buddy_pool.nearest_patch(cue, patches).shape == (2, 5)
        out.square().sum().backward()
        assert patches.grad is not None and pool.proj.weight.grad is not None
        assert pool.window_logits.grad is not None
        check_isolation(buddy_pool)
        print("OK")
    """)


def test_maxsim_loss_works_copied_alone(tmp_path):
    run_alone(tmp_path, "maxsim_loss.py", TORCH_ONLY_BLOCKED - {"maxsim_loss"}, """
        import torch
        import maxsim_loss
        torch.manual_seed(0)
        a, p, n = (torch.randn(3, 10, 8, requires_grad=True) for _ in range(3))
        mask = torch.ones(3, 10, dtype=torch.bool)
        mask[:, 7:] = False
        for in_batch in (True, False):
            loss = maxsim_loss.MaxSimLoss(margin=0.5, in_batch_negatives=in_batch)(a, p, n, mask, mask, mask)
            assert loss.dim() == 0 and torch.isfinite(loss)
            loss.backward()
        assert all(t.grad is not None for t in (a, p, n))
        assert maxsim_loss.maxsim_scores(a, p).shape == (3, 3)
        gathered, offset = maxsim_loss.gather_with_grad(a)
        assert gathered is a and offset == 0
        check_isolation(maxsim_loss)
        print("OK")
    """)


def test_model_utils_works_copied_alone(tmp_path):
    from conftest import TINY_KWARGS, TINY_MODEL
    run_alone(tmp_path, "model_utils.py", PROJECT_MODULES - {"model_utils"}, f"""
        import torch
        from PIL import Image
        import model_utils
        torch.manual_seed(0)
        model = model_utils.load_backbone({TINY_MODEL!r}, pretrained=False, **{TINY_KWARGS!r})
        transform = model_utils.make_transform(model)
        image = Image.new("RGBA", (70, 50), (200, 30, 90, 128))
        x = transform(image)
        assert x.shape == (3, {TINY_KWARGS['img_size']}, {TINY_KWARGS['img_size']}), x.shape
        with torch.inference_mode():
            cue, patches = model_utils.extract_tokens(model, x.unsqueeze(0))
            tokens = model.forward_features(x.unsqueeze(0))
        P, D = model.num_prefix_tokens, {TINY_KWARGS['embed_dim']}
        gh, gw = model_utils.grid_size(model)
        assert cue.shape == (1, P, D) and patches.shape == (1, gh, gw, D), (cue.shape, patches.shape)
        assert torch.equal(cue, tokens[:, :P]) and torch.equal(patches.reshape(1, -1, D), tokens[:, P:])
        check_isolation(model_utils)
        print("OK")
    """)
