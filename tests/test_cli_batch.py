"""liif-cuda upscale with several inputs, folders and patterns: output naming, skipping, failures,
the summary, torchrun sharding; and --size Wx / xH. Tiny images and the small checkpoint of
test_cli.py (no official weights)."""

import os
import shutil
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from liif_cuda import cli
from test_cli import checkpoint, error_of, run  # noqa: F401  (checkpoint: the fixture)


def save_image(path, w=14, h=10, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)
    return path


@pytest.fixture
def photos(tmp_path):
    """photos/a.png, photos/b.jpg, photos/sub/c.png, photos/notes.txt."""
    root = tmp_path / "photos"
    save_image(root / "a.png", seed=1)
    save_image(root / "b.jpg", seed=2)
    save_image(root / "sub" / "c.png", 8, 6, seed=3)
    (root / "notes.txt").write_text("not an image")
    return root


def console_script():
    exe = shutil.which("liif-cuda", path=os.path.dirname(sys.executable)) or shutil.which("liif-cuda")
    assert exe, "the liif-cuda console script is not installed"
    return exe


def files_under(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_several_files_into_a_new_folder(tmp_path, photos, checkpoint, capsys):
    out = tmp_path / "out" / "deeper"
    assert run("upscale", photos / "a.png", photos / "b.jpg", "-o", out, "--scale", 2,
               "--model", checkpoint) == 0
    assert files_under(out) == ["a_x2.png", "b_x2.jpg"]
    assert Image.open(out / "a_x2.png").size == (28, 20)
    stdout = capsys.readouterr().out
    assert "2 done, 0 skipped, 0 failed (2 of 2 files)" in stdout.splitlines()[-1]


def test_batch_matches_single_file(tmp_path, photos, checkpoint):
    assert run("upscale", photos / "a.png", "-o", tmp_path / "single.png", "--scale", 2.5,
               "--model", checkpoint) == 0
    assert run("upscale", photos / "a.png", photos / "b.jpg", "-o", tmp_path / "out", "--scale",
               2.5, "--model", checkpoint) == 0
    assert np.array_equal(np.array(Image.open(tmp_path / "single.png")),
                          np.array(Image.open(tmp_path / "out" / "a_x2.5.png")))


def test_folder_without_and_with_recursive(tmp_path, photos, checkpoint):
    assert run("upscale", photos, "-o", tmp_path / "flat", "--scale", 2, "--model", checkpoint) == 0
    assert files_under(tmp_path / "flat") == ["a_x2.png", "b_x2.jpg"]
    assert run("upscale", photos, "-o", tmp_path / "deep", "--scale", 2, "--model", checkpoint,
               "--recursive") == 0
    assert files_under(tmp_path / "deep") == ["a_x2.png", "b_x2.jpg", "sub/c_x2.png"]
    assert Image.open(tmp_path / "deep" / "sub" / "c_x2.png").size == (16, 12)


def test_glob_patterns_are_expanded_by_the_cli(tmp_path, photos, checkpoint):
    """The pattern reaches liif-cuda unexpanded (no shell here); ** spans folders with --recursive;
    matches keep their path below the pattern's wildcard-free folders."""
    assert run("upscale", f"{photos}/*.png", "-o", tmp_path / "o1", "--scale", 2,
               "--model", checkpoint) == 0
    assert files_under(tmp_path / "o1") == ["a_x2.png"]
    assert run("upscale", f"{photos}/**/*.png", "-o", tmp_path / "o2", "--scale", 2,
               "--model", checkpoint, "--recursive") == 0
    assert files_under(tmp_path / "o2") == ["a_x2.png", "sub/c_x2.png"]
    assert run("upscale", f"{photos}/s*", "-o", tmp_path / "o3", "--scale", 2,
               "--model", checkpoint) == 0
    assert files_under(tmp_path / "o3") == ["sub/c_x2.png"]


def test_format_and_size_naming(tmp_path, photos, checkpoint, capsys):
    assert run("upscale", photos, "-o", tmp_path / "out", "--size", "21x", "--format", "webp",
               "--model", checkpoint, "--recursive") == 0
    assert files_under(tmp_path / "out") == ["a_21x15.webp", "b_21x15.webp", "sub/c_21x16.webp"]
    assert Image.open(tmp_path / "out" / "sub" / "c_21x16.webp").size == (21, 16)
    assert "notice" not in capsys.readouterr().err


def test_skips_existing_outputs_unless_overwrite(tmp_path, photos, checkpoint, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "a_x2.png").write_bytes(b"precious")
    assert run("upscale", photos, "-o", out, "--scale", 2, "--model", checkpoint) == 0
    captured = capsys.readouterr()
    assert (out / "a_x2.png").read_bytes() == b"precious"
    assert "notice:" in captured.err and "a_x2.png exists, skipped" in captured.err
    assert "1 done, 1 skipped, 0 failed" in captured.out
    assert run("upscale", photos, "-o", out, "--scale", 2, "--model", checkpoint,
               "--overwrite") == 0
    assert Image.open(out / "a_x2.png").size == (28, 20)
    assert "2 done, 0 skipped, 0 failed" in capsys.readouterr().out


def test_a_failing_file_is_reported_and_the_others_are_written(tmp_path, photos, checkpoint):
    """Through the console script: a corrupt PNG among good ones."""
    (photos / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    out = tmp_path / "out"
    res = subprocess.run([console_script(), "upscale", str(photos), "-o", str(out), "--scale", "2",
                          "--model", checkpoint, "--device", "cpu"], capture_output=True, text=True)
    assert res.returncode == 1
    errors = [line for line in res.stderr.splitlines() if line.startswith("liif-cuda: error:")]
    assert len(errors) == 1 and "broken.png" in errors[0], res.stderr
    assert files_under(out) == ["a_x2.png", "b_x2.jpg"]
    assert res.stdout.splitlines()[-1] == "2 done, 0 skipped, 1 failed (3 of 3 files)"


def test_a_failed_write_leaves_nothing_and_the_run_goes_on(tmp_path, photos, checkpoint, capsys,
                                                           monkeypatch):
    real_save = Image.Image.save

    def save(self, fp, format=None, **kw):
        if format == "JPEG":
            fp.write(b"partial")
            raise OSError("disk full")
        return real_save(self, fp, format=format, **kw)
    monkeypatch.setattr(Image.Image, "save", save)
    assert run("upscale", photos, "-o", tmp_path / "out", "--scale", 2, "--model", checkpoint) == 1
    assert files_under(tmp_path / "out") == ["a_x2.png"]
    assert "disk full" in capsys.readouterr().err


def test_broken_links_are_named(tmp_path, photos, checkpoint, capsys):
    """A symlink loop inside a folder was left out without a word; named, it 'did not exist'."""
    os.symlink(photos / "loop.png", photos / "loop.png")
    os.symlink(tmp_path / "gone.png", photos / "dangling.png")
    assert run("upscale", photos, "-o", tmp_path / "out", "--scale", 2, "--model", checkpoint) == 0
    err = capsys.readouterr().err
    for name in ("loop.png", "dangling.png"):
        assert f"notice: {photos / name} is a broken symbolic link (or a loop); left out" in err
    for argv in ([photos / "loop.png", photos / "a.png", "-o", tmp_path / "out2"],
                 [photos / "loop.png", "-o", tmp_path / "out2.png"]):
        status, err = error_of(capsys, "upscale", *argv, "--scale", 2, "--model", checkpoint)
        assert err == (f"liif-cuda: error: input {photos / 'loop.png'} is a broken symbolic link "
                       f"(or a loop)")


def test_one_input_into_an_existing_folder(tmp_path, photos, checkpoint, capsys):
    """It used to be 'output ...: unsupported format'."""
    out = tmp_path / "out"
    out.mkdir()
    assert run("upscale", photos / "a.png", "-o", out, "--scale", 2, "--model", checkpoint) == 0
    assert files_under(out) == ["a_x2.png"]
    assert "1 done, 0 skipped, 0 failed (1 of 1 files)" in capsys.readouterr().out


def test_one_input_is_never_its_own_output(tmp_path, photos, checkpoint, capsys):
    before = (photos / "a.png").read_bytes()
    status, err = error_of(capsys, "upscale", photos / "a.png", "-o", photos / "a.png", "--scale",
                           2, "--model", checkpoint, "--overwrite")
    assert status == 1 and err == (f"liif-cuda: error: output {photos / 'a.png'} is the input; "
                                   f"not replacing it")
    assert (photos / "a.png").read_bytes() == before


def test_an_interrupt_says_what_was_done(tmp_path, photos, checkpoint, capsys, monkeypatch):
    """Ctrl-C during the second file: the first output stays whole, no partial second one, a
    summary of what was done, and the interrupt's status 130."""
    from liif_cuda.cli import upscale as upscale_cli
    real = upscale_cli.upscale_to_file
    calls = []

    def interrupted_second(image, out_w, out_h, model, args, output, overwrite):
        calls.append(output)
        if len(calls) == 2:
            def write(*a, **k):
                raise KeyboardInterrupt
            monkeypatch.setattr(Image.Image, "save", write)
        return real(image, out_w, out_h, model, args, output, overwrite)
    monkeypatch.setattr(upscale_cli, "upscale_to_file", interrupted_second)
    assert run("upscale", photos, "-o", tmp_path / "out", "--scale", 2, "--model", checkpoint,
               "--recursive") == 130
    captured = capsys.readouterr()
    assert files_under(tmp_path / "out") == ["a_x2.png"]  # no temporary file either
    assert captured.out.splitlines()[-1] == (f"interrupted at {photos / 'b.jpg'}: 1 done, 0 skipped, "
                                             f"0 failed, 2 not done (3 of 3 files)")
    assert captured.err.splitlines()[-1] == "liif-cuda: interrupted"


@pytest.mark.parametrize("make,argv,match,status", [
    (lambda t: (t / "file.png").write_bytes(b"x"), ["-o", "{tmp}/file.png"], "is not a folder", 2),
    (None, ["-o", "{tmp}/new.png"], "names the output folder", 2),
    (None, ["{tmp}/nothing*.png", "-o", "{tmp}/out"], "matches no image file", 1),
    (None, ["{tmp}/missing.png", "-o", "{tmp}/out"], "does not exist", 1),
    (None, ["--format", "png", "-o", "{tmp}/out"], "would both be written to {tmp}/out/b_*.png (*", 2),
])
def test_batch_errors_are_one_line(tmp_path, photos, checkpoint, capsys, make, argv, match, status):
    if make:
        make(tmp_path)
    save_image(photos / "b.png")  # b.jpg and b.png collide with --format png
    argv = [a.format(tmp=tmp_path) for a in argv]
    match = match.format(tmp=tmp_path)
    got, err = error_of(capsys, "upscale", photos, *argv, "--scale", 2, "--model", checkpoint)
    assert match in err and got == status
    assert not (tmp_path / "out").exists() or files_under(tmp_path / "out") == []


def test_outputs_in_an_input_folder_are_not_inputs(tmp_path, photos, checkpoint):
    """-o inside the folder scanned: earlier outputs are never upscaled again."""
    out = photos / "big"
    for _ in range(2):
        assert run("upscale", photos, "-o", out, "--scale", 2, "--model", checkpoint,
                   "--recursive") == 0
    assert files_under(out) == ["a_x2.png", "b_x2.jpg", "sub/c_x2.png"]


def test_no_image_says_why(tmp_path, photos, checkpoint, capsys):
    """An empty folder: no image; a folder whose images all lie in the output folder: how many."""
    (tmp_path / "empty").mkdir()
    got, err = error_of(capsys, "upscale", tmp_path / "empty", "-o", tmp_path / "out", "--scale", 2,
                        "--model", checkpoint)
    assert got == 1 and err.strip().endswith("error: no image files in the inputs")
    out = photos / "big"
    out.mkdir()
    for name in ("a_x2.png", "b_x2.png"):
        save_image(out / name)
    got, err = error_of(capsys, "upscale", out, "-o", out, "--scale", 2, "--model", checkpoint)
    assert got == 1 and (f"no image files in the inputs (2 inside the output folder {out}, which "
                         f"are not taken as inputs)") in err

def test_one_file_under_torchrun_is_rank_0s(tmp_path, photos, checkpoint, monkeypatch, capsys):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert run("upscale", photos / "a.png", "-o", tmp_path / "o.png", "--scale", 2,
               "--model", checkpoint) == 0
    assert not (tmp_path / "o.png").exists()
    assert "upscaled by rank 0" in capsys.readouterr().err


def result_lines(stdout):
    return [line.split(":")[0] for line in stdout.splitlines() if " from " in line]


def test_two_ranks_share_the_files(tmp_path, checkpoint):
    """torchrun's variables, set by hand on two concurrent processes of the console script: every
    file is written by exactly one rank, file i by rank i % 2."""
    names = [f"img{i}.png" for i in range(5)]
    for i, name in enumerate(names):
        save_image(tmp_path / "in" / name, 6 + i, 5, seed=i)
    out = tmp_path / "out"
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
                   OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen(
            [console_script(), "upscale", str(tmp_path / "in"), "-o", str(out), "--scale", "2",
             "--model", checkpoint, "--device", "cpu"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err for _, err in results]
    written = [result_lines(stdout) for stdout, _ in results]
    expected = [str(out / f"img{i}_x2.png") for i in range(5)]
    assert written == [expected[0::2], expected[1::2]]
    assert Counter(sum(written, [])) == Counter(expected)
    assert files_under(out) == sorted(f"img{i}_x2.png" for i in range(5))
    assert results[0][0].splitlines()[-1] == "rank 0 of 2: 3 done, 0 skipped, 0 failed (3 of 5 files)"
    assert results[1][0].splitlines()[-1] == "rank 1 of 2: 2 done, 0 skipped, 0 failed (2 of 5 files)"


def test_torchrun(tmp_path, checkpoint):
    """The real torchrun, two CPU processes through `python -m liif_cuda`: rank 0 adds the total."""
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    if torchrun is None:
        pytest.skip("torchrun is not installed next to this Python")
    for i in range(3):
        save_image(tmp_path / "in" / f"img{i}.png", 7, 5, seed=i)
    res = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "liif_cuda",
                          "upscale", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--scale",
                          "2", "--model", checkpoint, "--device", "cpu"],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert Counter(result_lines(res.stdout)) == Counter(
        str(tmp_path / "out" / f"img{i}_x2.png") for i in range(3))
    assert "all 2 ranks: 3 done, 0 skipped, 0 failed (3 files)" in res.stdout


def test_bad_torchrun_variables(tmp_path, photos, checkpoint, monkeypatch, capsys):
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "2")
    status, err = error_of(capsys, "upscale", photos, "-o", tmp_path / "out", "--scale", 2,
                           "--model", checkpoint)
    assert status == 2 and "RANK" in err


# ---- --size -----------------------------------------------------------------------------------

@pytest.mark.parametrize("size,expected", [("21x", (21, 15)), ("x7", (10, 7)), ("X5", (7, 5)),
                                           ("1x", (1, 1)), ("28x20", (28, 20))])
def test_size_keeps_the_aspect_ratio(tmp_path, photos, checkpoint, capsys, size, expected):
    """a.png is 14x10; an output smaller than it gets a notice (--size 10x is 10 wide, easily
    meant as 10 times), the others none."""
    out = tmp_path / "o.png"
    assert run("upscale", photos / "a.png", "-o", out, "--size", size, "--model", checkpoint) == 0
    assert Image.open(out).size == expected
    notices = [line for line in capsys.readouterr().err.splitlines() if "notice" in line]
    if expected[0] < 14 and expected[1] < 10:
        assert notices == [f"notice: --size gives {expected[0]}x{expected[1]}, smaller than "
                           f"{photos / 'a.png'} (14x10); to enlarge by a factor, use --scale"]
    else:
        assert notices == []


def test_scale_below_one_gives_a_notice(tmp_path, photos, checkpoint, capsys):
    """--scale 0.5 shrinks, as asked, with a notice (as a --size smaller than the input has);
    --scale 1 none."""
    for scale, size, expected in ((0.5, (7, 5), 1), (1, (14, 10), 0)):
        out = tmp_path / f"o{scale}.png"
        assert run("upscale", photos / "a.png", "-o", out, "--scale", scale, "--model",
                   checkpoint) == 0
        assert Image.open(out).size == size
        notices = [x for x in capsys.readouterr().err.splitlines() if x.startswith("notice:")]
        assert notices == [f"notice: --scale 0.5 gives 7x5, smaller than {photos / 'a.png'} "
                           f"(14x10): LIIF is made to enlarge"][:expected]


def test_a_large_output_without_a_terminal_says_it_started(tmp_path, photos, checkpoint, capsys,
                                                           monkeypatch):
    """An output large enough for a progress bar gets, without a terminal (here: captured), a line
    on stderr when its work starts instead (a log would keep the bar's fragments), and no bar."""
    import liif_cuda.cli.upscale
    monkeypatch.setattr(liif_cuda.cli.upscale, "PIXEL_BAR_MIN", 500)
    out = tmp_path / "o.png"
    assert run("upscale", photos / "a.png", "-o", out, "--scale", 2, "--model", checkpoint) == 0
    err = capsys.readouterr().err
    assert err == f"{out}: upscaling to 28x20 (0.0 megapixels) from 14x10\n"


def test_size_of_another_aspect_ratio_gives_a_notice(tmp_path, photos, checkpoint, capsys):
    out = tmp_path / "o.png"
    assert run("upscale", photos / "a.png", "-o", out, "--size", "20x20", "--model",
               checkpoint) == 0
    captured = capsys.readouterr()
    notices = [line for line in captured.err.splitlines() if line.startswith("notice:")]
    assert len(notices) == 1 and "aspect ratio" in notices[0] and "a.png" in notices[0]
    assert "notice" not in captured.out
    assert Image.open(out).size == (20, 20)


def test_proportional_rounding():
    assert cli.fit_size((21, None), 14, 10) == (21, 15)       # 15.0
    assert cli.fit_size((7, None), 14, 10) == (7, 5)          # 5.0
    assert cli.fit_size((3, None), 14, 10) == (3, 2)          # 2.14
    assert cli.fit_size((None, 3), 2, 4) == (2, 3)            # 1.5: halves up
    assert cli.fit_size((1, None), 1000, 1) == (1, 1)         # at least 1
    assert cli.keeps_aspect(21, 15, 14, 10) and not cli.keeps_aspect(21, 16, 14, 10)
    # One side rounded from the other is enough: 5x of 10x3 is 5x2 (1.5 up), though x2 is 7x2.
    assert cli.keeps_aspect(5, 2, 10, 3) and cli.fit_size((None, 2), 10, 3) == (7, 2)


@pytest.mark.parametrize("size", ["x", "12x4x3", "axb", "0x", "x0", "0x0", "12", "1.5x2", ""])
def test_bad_sizes_are_usage_errors(tmp_path, photos, checkpoint, capsys, size):
    status, err = error_of(capsys, "upscale", photos / "a.png", "-o", tmp_path / "o.png", "--size",
                           size, "--model", checkpoint)
    assert status == 2 and "--size" in err


def test_a_batch_never_overwrites_one_of_its_inputs(tmp_path, photos, checkpoint, capsys):
    """Two explicit inputs, one the other's output name, --overwrite, -o their folder: that
    output is refused and reported, the input kept, the other file done."""
    save_image(photos / "a_x2.png", 28, 20, seed=9)
    before = (photos / "a_x2.png").read_bytes()
    assert run("upscale", photos / "a.png", photos / "a_x2.png", "-o", photos, "--scale", 2,
               "--model", checkpoint, "--overwrite") == 1
    captured = capsys.readouterr()
    assert (photos / "a_x2.png").read_bytes() == before
    assert f"output {photos / 'a_x2.png'} is one of the inputs; not replacing it" in captured.err
    assert (photos / "a_x2_x2.png").exists()
    assert "1 done, 0 skipped, 1 failed (2 of 2 files)" in captured.out


def test_hidden_files_and_folders_are_not_inputs(tmp_path, photos, checkpoint):
    """As glob's *: .hidden.png and .cache/ are left out, with --recursive too."""
    save_image(photos / ".hidden.png", seed=5)
    save_image(photos / ".cache" / "d.png", seed=6)
    assert run("upscale", photos, "-o", tmp_path / "out", "--scale", 2, "--model", checkpoint,
               "--recursive") == 0
    assert files_under(tmp_path / "out") == ["a_x2.png", "b_x2.jpg", "sub/c_x2.png"]
