"""The demo (train.py): its pieces against independent computations, and whole runs with a tiny model.

Whole runs use the tiny model of conftest (56 px, 4x4 grid, dim 64) through ``--timm-kwargs``: in-process
through ``train.main`` where possible (no interpreter start-up), as a subprocess where the process itself
is the point (exit status, no traceback, torchrun).
"""
import json
import math
import os
import socket
import subprocess
import sys

import pytest
import torch
from PIL import Image

import train
from buddy_pool import BuddyPool, nearest_patch
from maxsim_loss import MaxSimLoss
from conftest import ROOT, TINY_KWARGS, TINY_MODEL
from model_utils import extract_tokens, load_backbone, make_transform

TINY_CLI = ["--timm-kwargs", json.dumps({k: v for k, v in TINY_KWARGS.items() if k != "img_size"}),
            "--img-size", str(TINY_KWARGS["img_size"])]
RANDOM_TINY = ["--weights", "random"] + TINY_CLI


def run_main(argv, capsys):
    """train.main in this process -> (exit status, stdout, stderr)."""
    try:
        status = train.main([str(a) for a in argv])
    except SystemExit as e:  # argparse
        status = e.code
    out, err = capsys.readouterr()
    return status, out, err


def run_cli(args, cwd, timeout=240, launcher=None):
    """train.py in a fresh interpreter (or under ``launcher``) -> CompletedProcess."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    command = [sys.executable] + (launcher or []) + [os.path.join(ROOT, "train.py")] + [str(a) for a in args]
    return subprocess.run(command, cwd=str(cwd), env=env, capture_output=True, text=True, timeout=timeout)


def assert_one_error_line(status, err, *words):
    assert status == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("train.py: error:"), err
    assert "Traceback" not in err
    for word in words:
        assert word in lines[0], (word, lines[0])


def make_photo_folder(root, n=12):
    """n generated pictures saved as ordinary files: nested folders, mixed formats and PIL modes."""
    pictures = train.synthetic_images(n, seed=7, size=96)
    layout = [("a", ".jpg", "RGB"), ("a/b", ".png", "RGBA"), ("", ".webp", "RGB"), ("c", ".bmp", "P"),
              ("c/d/e", ".JPEG", "L"), ("", ".png", "LA")]
    paths = []
    for i, picture in enumerate(pictures):
        folder, ext, mode = layout[i % len(layout)]
        os.makedirs(os.path.join(root, folder), exist_ok=True)
        path = os.path.join(root, folder, f"img{i:02d}{ext}")
        picture.convert(mode).save(path)
        paths.append(path)
    return sorted(paths)


# ------------------------------------------------------------------------------------------ folder loader

def test_find_images_nested_mixed_formats_and_modes_skips_corrupt_files(tmp_path):
    good = make_photo_folder(str(tmp_path), n=6)
    (tmp_path / "a" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    truncated = tmp_path / "c" / "truncated.jpg"
    with open(os.path.join(str(tmp_path), "a", "img00.jpg"), "rb") as f:
        jpeg = f.read()
    truncated.write_bytes(jpeg[:len(jpeg) // 2])
    (tmp_path / "notes.txt").write_text("not an image, not even tried")
    (tmp_path / ".hidden.jpg").write_bytes(jpeg)        # hidden: ignored, like macOS "._x.jpg" forks
    os.makedirs(tmp_path / ".cache")
    (tmp_path / ".cache" / "x.png").write_bytes(b"junk")

    warnings = []
    found = train.find_images(str(tmp_path), warn=warnings.append)

    assert found == good
    assert len(warnings) == 2
    assert all(w.startswith("warning:") and "\n" not in w for w in warnings)
    assert any(str(tmp_path / "a" / "corrupt.png") in w for w in warnings)
    assert any(str(truncated) in w for w in warnings)
    # Every mode the folder holds becomes a model input.
    model = load_backbone(TINY_MODEL, pretrained=False, **TINY_KWARGS)
    transform = make_transform(model, augment=True)
    assert {Image.open(p).mode for p in found} >= {"RGB", "RGBA", "P", "L", "LA"}
    for path in found:
        assert transform(train.open_image(path)).shape == (3, 56, 56)


def test_find_images_refuses_empty_missing_file_and_single_image(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="at least 2 readable images.*found 0"):
        train.find_images(str(empty), warn=lambda m: None)
    one = tmp_path / "one"
    one.mkdir()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(one / "only.png")
    (one / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    warnings = []
    with pytest.raises(ValueError, match="found 1"):
        train.find_images(str(one), warn=warnings.append)
    assert len(warnings) == 1 and "broken.jpg" in warnings[0]
    with pytest.raises(FileNotFoundError, match="no such folder"):
        train.find_images(str(tmp_path / "missing"))
    with pytest.raises(NotADirectoryError, match="expected a folder"):
        train.find_images(str(one / "only.png"))


def test_cli_folder_errors_are_one_line_and_exit_2(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_error_line(*run_main(RANDOM_TINY + ["--images", empty], capsys)[::2], "at least 2")
    assert_one_error_line(*run_main(RANDOM_TINY + ["--images", tmp_path / "nope"], capsys)[::2], "no such folder")
    (tmp_path / "file.png").write_bytes(b"x")
    assert_one_error_line(*run_main(RANDOM_TINY + ["--images", tmp_path / "file.png"], capsys)[::2],
                          "expected a folder")


# ------------------------------------------------------------------------------------------------- split

@pytest.mark.parametrize("held_out", [0.1, 0.3, 0.5, 0.9])
def test_split_images_is_disjoint_complete_and_seeded(held_out):
    for n in range(2, 41):
        train_ids, held_ids = train.split_images(n, held_out, seed=3)
        assert not set(train_ids) & set(held_ids), (n, held_out)
        assert sorted(train_ids + held_ids) == list(range(n))
        want = min(max(round(held_out * n), 2 if n >= 4 else 1), n - 2 if n >= 3 else n - 1)
        assert len(held_ids) == want, (n, held_out)
        assert len(train_ids) >= (1 if n == 2 else 2)
        assert train.split_images(n, held_out, seed=3) == (train_ids, held_ids)
    assert train.split_images(40, held_out, seed=3) != train.split_images(40, held_out, seed=4)


# ------------------------------------------------------------------------------------ views and triplets

def test_seeded_views_are_reproducible_and_leave_global_rngs_alone():
    import random
    model = load_backbone(TINY_MODEL, pretrained=False, **TINY_KWARGS)
    transform = make_transform(model, augment=True)
    image = train.synthetic_images(1, seed=0, size=96)[0]
    torch.manual_seed(5)
    random.seed(5)
    torch_state, py_state = torch.get_rng_state(), random.getstate()
    a = train.seeded_view(transform, image, train.view_seed(0, 3, 0))
    b = train.seeded_view(transform, image, train.view_seed(0, 3, 0))
    c = train.seeded_view(transform, image, train.view_seed(0, 3, 1))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert torch.equal(torch.get_rng_state(), torch_state) and random.getstate() == py_state


def test_token_cache_shapes_and_shards_see_the_same_views():
    model = load_backbone(TINY_MODEL, pretrained=False, **TINY_KWARGS)
    transform = make_transform(model, augment=True)
    images = train.synthetic_images(5, seed=1, size=64)
    cue, patches = train.extract_view_tokens(model, images, [0, 1, 2, 3, 4], transform, seed=1, batch_size=4,
                                             log=lambda m: None)
    assert cue.shape == (5, 2, 5, 64) and patches.shape == (5, 2, 4, 4, 64)
    assert not cue.is_inference() and not patches.is_inference()
    # A shard of the images gets exactly the views the whole set gets (what torchrun relies on).
    cue_shard, patches_shard = train.extract_view_tokens(model, images, [3, 1], transform, seed=1, batch_size=2,
                                                         log=lambda m: None)
    torch.testing.assert_close(cue_shard, cue[[3, 1]], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(patches_shard, patches[[3, 1]], atol=1e-5, rtol=1e-5)
    # And they are the backbone's tokens of those views.
    view = train.seeded_view(transform, images[3], train.view_seed(1, 3, 1))
    with torch.inference_mode():
        want_cue, want_patches = extract_tokens(model, view[None])
    torch.testing.assert_close(cue[3, 1], want_cue[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(patches[3, 1], want_patches[0], atol=1e-5, rtol=1e-5)


def test_sample_triplets():
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        a, av, p, pv, ng, nv = train.sample_triplets(7, 5, g)
        assert len(set(a.tolist())) == 5 and torch.equal(a, p)
        assert torch.equal(pv, 1 - av) and set(av.tolist() + nv.tolist()) <= {0, 1}
        assert (ng != a).all() and ((ng >= 0) & (ng < 7)).all()


def test_train_pool_tells_the_loss_which_image_each_triplet_shows():
    """In-batch negatives that show the anchor's own image must be left out: train_pool passes the images'
    global ids, so the loss can. Checked against the sampled indices, with ids that are not 0..n-1."""
    torch.manual_seed(0)
    n, P, D = 6, 2, 8
    cue, patches = torch.randn(n, 2, P, D), torch.randn(n, 2, 3, 3, D)
    image_ids = [10, 12, 14, 16, 18, 20]                       # e.g. this process's shard of all images
    seen = []

    class Spy(MaxSimLoss):
        def forward(self, anchor, positive, negative, **kwargs):
            seen.append((kwargs["anchor_ids"].clone(), kwargs["negative_ids"].clone()))
            return super().forward(anchor, positive, negative, **kwargs)

    windows, valid = train.cache_windows(BuddyPool(D), cue, patches)
    train.train_pool(train.CachedBuddyPool(BuddyPool(D)), cue, windows, valid, steps=3, batch_size=4, lr=1e-3, loss_fn=Spy(),
                     generator=torch.Generator().manual_seed(5), ddp=train.Dist("cpu"), image_ids=image_ids,
                     log=lambda m: None)
    replay = torch.Generator().manual_seed(5)
    assert len(seen) == 3
    for anchor_ids, negative_ids in seen:
        a, _, _, _, ng, _ = train.sample_triplets(n, 4, replay)
        assert anchor_ids.tolist() == [image_ids[i] for i in a.tolist()]
        assert negative_ids.tolist() == [image_ids[i] for i in ng.tolist()]


# --------------------------------------------------------------------------------------------- metrics

def brute_force_metrics(scores):
    """recall@1, recall@5, MRR with a Python loop; ties count against the query."""
    q = len(scores)
    r1 = r5 = rr = 0.0
    for i in range(q):
        rank = 1 + sum(1 for j in range(q) if j != i and scores[i][j] >= scores[i][i])
        r1 += rank <= 1
        r5 += rank <= 5
        rr += 1.0 / rank
    return {"recall@1": r1 / q, "recall@5": r5 / q, "mrr": rr / q}


def test_retrieval_metrics_match_a_loop_including_ties():
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 4, (9, 9), generator=g).float()   # many ties
    assert train.retrieval_metrics(scores) == pytest.approx(brute_force_metrics(scores.tolist()))
    scores = torch.randn(12, 12, generator=g) + 2 * torch.eye(12)
    assert train.retrieval_metrics(scores) == pytest.approx(brute_force_metrics(scores.tolist()))
    assert train.retrieval_metrics(torch.eye(6)) == {"recall@1": 1.0, "recall@5": 1.0, "mrr": 1.0}
    assert train.retrieval_metrics(torch.ones(6, 6))["recall@1"] == 0.0


def brute_maxsim(query, doc):
    """Mean over query tokens of the max cosine over doc tokens, one token pair at a time."""
    total = 0.0
    for q in query:
        total += max(float(torch.dot(q, d) / (q.norm() * d.norm())) for d in doc)
    return total / len(query)


def brute_window_mean(cue, patches, k):
    """Buddy tokens at initialisation: mean of the clipped k x k window around each cue's nearest patch."""
    H, W, _ = patches.shape
    out = []
    for c in cue:
        best, where = -2.0, None
        for r in range(H):
            for col in range(W):
                sim = float(torch.dot(c, patches[r, col]) / (c.norm() * patches[r, col].norm()))
                if sim > best:
                    best, where = sim, (r, col)
        r, col = where
        window = [patches[y, x] for y in range(r - k // 2, r + k // 2 + 1)
                  for x in range(col - k // 2, col + k // 2 + 1) if 0 <= y < H and 0 <= x < W]
        out.append(torch.stack(window).mean(0))
    return torch.stack(out)


def test_three_way_table_matches_a_direct_computation():
    g = torch.Generator().manual_seed(0)
    n, P, H, W, D = 7, 3, 3, 4, 8
    cue = torch.randn(n, 2, P, D, generator=g, dtype=torch.float64)
    patches = torch.randn(n, 2, H, W, D, generator=g, dtype=torch.float64)
    cue[:, 1] = cue[:, 0] + 0.8 * cue[:, 1]            # the positive view resembles its anchor
    patches[:, 1] = patches[:, 0] + 0.8 * patches[:, 1]
    trained = BuddyPool(D).double()
    with torch.no_grad():
        for p in trained.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g, dtype=torch.float64))

    def table_row(represent):
        sets = [[represent(i, v) for i in range(n)] for v in range(2)]
        scores = [[brute_maxsim(sets[0][i], sets[1][j]) for j in range(n)] for i in range(n)]
        return brute_force_metrics(scores)

    want_cue = table_row(lambda i, v: cue[i, v])
    want_init = table_row(lambda i, v: torch.cat([cue[i, v], brute_window_mean(cue[i, v], patches[i, v], 3)]))
    with torch.no_grad():
        want_trained = table_row(lambda i, v: torch.cat([cue[i, v], trained(cue[i, v][None], patches[i, v][None])[0]]))

    windows, valid = train.cache_windows(BuddyPool(D), cue, patches)                  # what the demo trains and evaluates on
    assert windows.shape == (n, 2, P, 9, D) and valid.shape == (n, 2, P, 9)
    assert train.evaluate(cue, windows, valid, None) == pytest.approx(want_cue)
    assert train.evaluate(cue, windows, valid, BuddyPool(D).double()) == pytest.approx(want_init)
    assert train.evaluate(cue, windows, valid, trained) == pytest.approx(want_trained)
    assert want_init != want_cue or want_trained != want_init  # the data separates the rows


# ------------------------------------------------------------------------------------------- save/load

def test_save_load_round_trip_and_refusals(tmp_path):
    torch.manual_seed(1)
    pool = BuddyPool(16, kernel_size=3)
    with torch.no_grad():
        for p in pool.parameters():
            p.copy_(torch.randn_like(p))
    path = str(tmp_path / "buddy.safetensors")
    train.save_pool(pool, path, backbone="some_vit", img_size=56)
    assert os.listdir(tmp_path) == ["buddy.safetensors"]     # no temporary file left behind

    state, meta = train.load_pool(path, dim=16, kernel_size=3)
    assert meta == {"format": train.SAVE_FORMAT, "dim": "16", "kernel_size": "3", "backbone": "some_vit",
                    "img_size": "56"}
    restored = BuddyPool(int(meta["dim"]), kernel_size=int(meta["kernel_size"]))
    restored.load_state_dict(state)
    cue, patches = torch.randn(2, 5, 16), torch.randn(2, 4, 4, 16)
    assert torch.equal(restored(cue, patches), pool(cue, patches))

    with pytest.raises(ValueError, match="dim 16, kernel size 3.*needs dim 32, kernel size 3"):
        train.load_pool(path, dim=32, kernel_size=3)
    with pytest.raises(ValueError, match="needs dim 16, kernel size 5"):
        train.load_pool(path, dim=16, kernel_size=5)
    (tmp_path / "junk.safetensors").write_bytes(b"definitely not safetensors")
    with pytest.raises(ValueError, match="not a BuddyPool file"):
        train.load_pool(str(tmp_path / "junk.safetensors"), dim=16, kernel_size=3)
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a BuddyPool file"):
        train.load_pool(str(tmp_path / "other.safetensors"), dim=16, kernel_size=3)
    with pytest.raises(FileNotFoundError):
        train.load_pool(str(tmp_path / "missing.safetensors"), dim=16, kernel_size=3)


# ------------------------------------------------------------------------------------------------ picture

def expected_outline_box(centre, grid, k, tile_hw, cue, line):
    """Where cue ``cue``'s window outline should be on a tile (the layout render_viz documents)."""
    gh, gw = grid
    th, tw = tile_hw
    r, c = divmod(centre, gw)
    r0, r1 = max(0, r - k // 2), min(gh - 1, r + k // 2)
    c0, c1 = max(0, c - k // 2), min(gw - 1, c + k // 2)
    inset = cue * (line + 2) + 1
    return (c0 * tw // gw + inset, r0 * th // gh + inset, (c1 + 1) * tw // gw - 1 - inset,
            (r1 + 1) * th // gh - 1 - inset)


def outline_fraction(picture, origin, box, colour):
    """Over the four sides of the box's 1 px perimeter, the smallest fraction painted exactly ``colour``.

    A box at a wrong window position has at least one side on a line where the true outline is not, so its
    smallest fraction is near 0 even when other sides coincide with the true outline's."""
    x, y = origin
    x0, y0, x1, y1 = box
    sides = ([(u, y0) for u in range(x0, x1 + 1)], [(u, y1) for u in range(x0, x1 + 1)],
             [(x0, v) for v in range(y0, y1 + 1)], [(x1, v) for v in range(y0, y1 + 1)])
    return min(sum(picture.getpixel((x + u, y + v)) == colour for u, v in side) / len(side) for side in sides)


def assert_windows_drawn(picture, layout, centres, grid, k):
    """Each cue's outline is where centres says, and at no other window position."""
    tile = tuple(layout["tile"])
    for i, origin in enumerate(layout["origins"]):
        for cue, centre in enumerate(centres[i]):
            colour = train.CUE_COLOURS[cue]
            fractions = [outline_fraction(picture, origin,
                                          expected_outline_box(cand, grid, k, tile, cue, layout["line"]), colour)
                         for cand in range(grid[0] * grid[1])]
            assert fractions[centre] >= 0.75, (i, cue, fractions[centre])
            assert max(f for cand, f in enumerate(fractions) if cand != centre) <= 0.25, (i, cue, fractions)


def test_render_viz_draws_each_window_where_nearest_patch_says():
    g = torch.Generator().manual_seed(0)
    grid, D, k = (4, 4), 16, 3
    patches = torch.randn(3, *grid, D, generator=g)
    # Cue c of image i is a copy of one chosen patch: that patch is its nearest, by construction.
    chosen = torch.tensor([[0, 5, 10, 15, 3], [12, 12, 6, 1, 9], [7, 7, 7, 0, 14]])
    cue = patches.reshape(3, 16, D).gather(1, chosen[..., None].expand(3, 5, D))
    centres = BuddyPool(D).nearest_patch(cue, patches)
    assert torch.equal(centres, chosen)
    images = [Image.new("RGB", (56, 56), (128, 128, 128)) for _ in range(3)]

    picture, layout = train.render_viz(images, centres, grid, k, captions=["a", "b", "c"])

    scale = layout["scale"]
    assert scale * 56 >= train.VIZ_TILE_MIN and tuple(layout["tile"]) == (56 * scale, 56 * scale)
    assert picture.width == train.VIZ_MARGIN + 3 * (56 * scale + train.VIZ_MARGIN)
    assert_windows_drawn(picture, layout, centres.tolist(), grid, k)
    # The chosen patch of the last-drawn cue is marked with a dot of its colour at the patch centre.
    x, y = layout["origins"][0]
    r, c = divmod(3, 4)
    assert picture.getpixel((x + (2 * c + 1) * 56 * scale // 8, y + (2 * r + 1) * 56 * scale // 8)) == \
        train.CUE_COLOURS[4]


# --------------------------------------------------------------------------------------- whole runs

def test_demo_cli_end_to_end_with_auto_weights_offline(tmp_path):
    """`python train.py` as a user runs it: offline, --weights auto falls back with ONE warning line."""
    metrics = tmp_path / "m.json"
    proc = run_cli(TINY_CLI + ["--num-images", 14, "--steps", 6, "--batch-size", 4, "--metrics", metrics], tmp_path)
    assert proc.returncode == 0, proc.stderr
    warning = proc.stderr.strip().splitlines()
    assert len(warning) == 1 and warning[0].startswith("warning:") and "RANDOMLY INITIALISED" in warning[0], \
        proc.stderr
    out = proc.stdout.splitlines()
    assert out[0] == "CLS + Buddy tokens demo"
    assert out[-1].startswith("summary: held-out recall@1 ")
    m = json.loads(metrics.read_text())
    assert m["weights"]["requested"] == "auto" and m["weights"]["used"] == "random"
    assert "HF_HUB_OFFLINE" in m["weights"]["fallback_reason"]
    assert len(m["losses"]) == 6 and all(math.isfinite(x) and x >= 0 for x in m["losses"])
    assert sum(f"loss {x:.4f}" in proc.stdout for x in m["losses"]) >= 2   # the loss is shown as it trains
    assert m["data"]["images"] == 14
    assert m["data"]["train_images"] + m["data"]["held_out_images"] == 14
    assert m["data"]["held_out_evaluated"] == m["data"]["held_out_images"]
    assert m["tokens"] == {"cue": 5, "grid": [4, 4], "dim": 64, "per_image": 10}
    assert set(m["timings_s"]) >= {"imports", "load_backbone", "extract_tokens", "train", "evaluate", "total"}
    # The table on the terminal shows the JSON's figures.
    for key, label in (("cue_only", "cue only"), ("cue_buddy_init", "cue + Buddy at init (mean)"),
                       ("cue_buddy_trained", "cue + trained Buddy")):
        row = next(line for line in out if line.strip().startswith(label))
        figures = [float(x) for x in row.split()[-3:]]
        want = m["ablation"][key]
        assert figures == pytest.approx([want["recall@1"], want["recall@5"], want["mrr"]], abs=5e-4)
    assert m["recall@1_before"] == m["ablation"]["cue_buddy_init"]["recall@1"]
    assert m["recall@1_after"] == m["ablation"]["cue_buddy_trained"]["recall@1"]


def test_demo_on_a_photo_folder_with_viz_save_and_load(tmp_path, capsys):
    folder = tmp_path / "photos"
    paths = make_photo_folder(str(folder), n=12)
    (folder / "a" / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    first = out_dir / "m1.json"
    argv = RANDOM_TINY + ["--images", folder, "--steps", 8, "--batch-size", 4, "--seed", 2]

    status, out, err = run_main(argv + ["--viz", out_dir / "viz.png", "--save", out_dir / "buddy.safetensors",
                                        "--metrics", first], capsys)

    assert status == 0, err
    warnings = err.strip().splitlines()
    assert len(warnings) == 1 and warnings[0].startswith("warning:") and "broken.jpg" in warnings[0], err
    assert sorted(os.listdir(out_dir)) == ["buddy.safetensors", "m1.json", "viz.png"]
    m = json.loads(first.read_text())
    assert m["data"]["source"] == "folder" and m["data"]["images"] == 12
    assert m["data"]["held_out_ids"] == train.split_images(12, 0.3, 2)[1]
    assert m["written_by_rank"] == 0

    # The picture: windows drawn where nearest_patch puts them on those held-out photos.
    viz = m["viz"]
    assert viz["files"] == [paths[i] for i in viz["image_ids"]]
    assert viz["image_ids"] == m["data"]["held_out_ids"][:4]
    torch.manual_seed(2)
    model = load_backbone(TINY_MODEL, pretrained=False, **TINY_KWARGS)     # the demo's weights (same seed)
    batch = torch.stack([make_transform(model)(train.open_image(p)) for p in viz["files"]])
    with torch.no_grad():
        centres = nearest_patch(*extract_tokens(model, batch))
    assert centres.tolist() == viz["nearest_patch"]
    picture = Image.open(out_dir / "viz.png")
    assert picture.format == "PNG" and list(picture.size) == viz["size"]
    assert_windows_drawn(picture.convert("RGB"), viz, viz["nearest_patch"], (4, 4), 3)

    # --load continues from the saved pool: same seed, same images, so it starts where run 1 ended.
    second = out_dir / "m2.json"
    status, out, err = run_main(argv + ["--load", out_dir / "buddy.safetensors", "--steps", 0, "--metrics", second],
                                capsys)
    assert status == 0, err
    m2 = json.loads(second.read_text())
    assert m2["recall@1_before"] == m["recall@1_after"]
    assert m2["ablation"]["cue_buddy_trained"] == m["ablation"]["cue_buddy_trained"]
    assert m2["ablation"]["cue_buddy_init"] == m["ablation"]["cue_buddy_init"]

    # ... and refuses a pool of another kernel size or dimension.
    os.remove(folder / "a" / "broken.jpg")  # (its warning line would come first)
    assert_one_error_line(*run_main(argv + ["--load", out_dir / "buddy.safetensors", "--kernel-size", 5],
                                    capsys)[::2], "kernel size 3", "kernel size 5")
    other = ["--timm-kwargs", json.dumps({"depth": 1, "embed_dim": 32, "num_heads": 2})]
    assert_one_error_line(*run_main(argv + other + ["--load", out_dir / "buddy.safetensors"], capsys)[::2],
                          "dim 64", "dim 32")


@pytest.mark.parametrize("extra,words", [
    (["--steps", "-1"], ["--steps"]),
    (["--batch-size", "0"], ["--batch-size"]),
    (["--lr", "nan"], ["--lr"]),
    (["--held-out", "1.5"], ["--held-out"]),
    (["--kernel-size", "4"], ["--kernel-size"]),
    (["--num-images", "1"], ["--num-images"]),
    (["--timm-kwargs", "{depth: 2}"], ["--timm-kwargs"]),
    (["--timm-kwargs", '{"img_size": 56}'], ["--img-size"]),
    (["--viz", "out.jpg"], ["--viz", ".png"]),
    (["--metrics", "/no/such/folder/m.json"], ["--metrics"]),
    (["--load", "/no/such/file.safetensors"], ["--load"]),
    (["--device", "cuda:0"] if not torch.cuda.is_available() else ["--device", "nonsense"], ["--device"]),
    (["--steps", "many"], ["--steps"]),
    (["--no-such-flag"], ["--no-such-flag"]),
    (["--weights", "/no/such/weights.pth"], ["no such file"]),
    (["--model", "not_a_timm_model"], ["not_a_timm_model"]),
    (["--weights", "hub"], ["--weights hub", "HF_HUB_OFFLINE"]),
])
def test_bad_arguments_are_one_line_and_exit_2(extra, words, capsys):
    args = TINY_CLI + ["--steps", "1", "--num-images", "4"] + extra
    assert_one_error_line(*run_main(args, capsys)[::2], *words)


def test_bad_argument_in_a_real_process_has_no_traceback(tmp_path):
    proc = run_cli(["--batch-size", "0"], tmp_path)
    assert_one_error_line(proc.returncode, proc.stderr, "--batch-size")
    assert proc.stdout == ""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_processes(tmp_path, capsys):
    """torchrun --nproc_per_node=2: gloo, sharded tokens, DDP; rank 0 alone prints and writes."""
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    args = RANDOM_TINY + ["--num-images", 20, "--steps", 4, "--batch-size", 3]
    port = free_port()
    launcher = ["-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2", "--rdzv-backend=c10d",
                f"--rdzv-endpoint=127.0.0.1:{port}", "--master_addr=127.0.0.1", f"--master_port={port}"]
    proc = run_cli(args + ["--metrics", out_dir / "m.json", "--viz", out_dir / "viz.png",
                           "--save", out_dir / "buddy.safetensors"], tmp_path, launcher=launcher)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sorted(os.listdir(out_dir)) == ["buddy.safetensors", "m.json", "viz.png"]
    assert proc.stdout.count("CLS + Buddy tokens demo") == 1 and proc.stdout.count("summary:") == 1
    m = json.loads((out_dir / "m.json").read_text())
    assert m["world_size"] == 2 and m["written_by_rank"] == 0
    assert len(m["losses"]) == 4 and all(math.isfinite(x) for x in m["losses"])
    assert m["data"]["held_out_evaluated"] == m["data"]["held_out_images"] == len(m["data"]["held_out_ids"])

    # Every held-out image evaluated once, with the views one process would make: before training, the
    # figures equal a single-process run's.
    single = tmp_path / "single.json"
    status, _, err = run_main(args + ["--metrics", single], capsys)
    assert status == 0, err
    s = json.loads(single.read_text())
    assert s["data"]["held_out_ids"] == m["data"]["held_out_ids"]
    for key in ("cue_only", "cue_buddy_init"):
        assert m["ablation"][key] == pytest.approx(s["ablation"][key], abs=1e-6)


@pytest.mark.parametrize("side,grid,k", [(448, (32, 32), 1), (56, (4, 4), 5), (70, (5, 7), 3)])
def test_render_viz_small_windows_fine_grids_and_non_square_grids(side, grid, k):
    """Windows too small for five nested outlines (k=1 on a 32x32 grid) still draw, and so do other shapes."""
    centres = torch.tensor([[0, 1, grid[1], grid[0] * grid[1] - 1, grid[0] * grid[1] // 2]])
    picture, layout = train.render_viz([Image.new("RGB", (side, side), (128, 128, 128))], centres, grid, k)
    th, tw = layout["tile"]
    x, y = layout["origins"][0]
    for cue, centre in enumerate(centres[0].tolist()):
        r, c = divmod(centre, grid[1])
        dot = (x + (2 * c + 1) * tw // (2 * grid[1]), y + (2 * r + 1) * th // (2 * grid[0]))
        assert picture.getpixel(dot) == train.CUE_COLOURS[cue], (cue, centre)


def test_weights_from_a_local_file_and_too_few_images_to_train(tmp_path, capsys):
    from safetensors.torch import save_file
    torch.manual_seed(123)
    model = load_backbone(TINY_MODEL, pretrained=False, **TINY_KWARGS)
    weights = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    metrics = tmp_path / "m.json"

    status, out, err = run_main(TINY_CLI + ["--weights", weights, "--num-images", 2, "--metrics", metrics], capsys)

    assert status == 0, err
    m = json.loads(metrics.read_text())
    assert m["weights"] == {"requested": str(weights), "used": "checkpoint", "checkpoint": str(weights),
                            "fallback_reason": None}
    # 2 images: 1 held out, 1 to train on -- no negative, so training is skipped with one warning line.
    assert (m["data"]["train_images"], m["data"]["held_out_images"]) == (1, 1)
    assert m["losses"] == [] and m["training"]["steps"] == 0
    assert len(err.strip().splitlines()) == 1 and "training skipped" in err
    assert m["ablation"]["cue_only"] == {"recall@1": 1.0, "recall@5": 1.0, "mrr": 1.0}  # 1 candidate


def test_bf16_and_compile_options_train_like_the_default(tmp_path, capsys):
    """--compile (aot_eager: the same arithmetic, traced) gives the default run's losses; --bf16 close to them."""
    runs = {}
    for name, extra in (("eager", []), ("compile", ["--compile", "aot_eager"]), ("bf16", ["--bf16"])):
        metrics = tmp_path / f"{name}.json"
        status, _, err = run_main(RANDOM_TINY + ["--num-images", 10, "--steps", 4, "--batch-size", 4,
                                                 "--metrics", metrics] + extra, capsys)
        assert status == 0, err
        runs[name] = json.loads(metrics.read_text())
    assert runs["compile"]["training"]["compile"] == "aot_eager" and runs["bf16"]["training"]["bf16"] is True
    assert runs["eager"]["training"]["compile"] is None and runs["eager"]["training"]["bf16"] is False
    assert runs["compile"]["losses"] == pytest.approx(runs["eager"]["losses"], abs=1e-5)
    assert runs["bf16"]["losses"] == pytest.approx(runs["eager"]["losses"], abs=2e-2)
    assert runs["bf16"]["losses"] != runs["eager"]["losses"]  # autocast really ran in bfloat16
    status, _, err = run_main(RANDOM_TINY + ["--compile", "no_such_backend"], capsys)
    assert_one_error_line(status, err, "--compile", "no_such_backend")
