"""The folder transaction in lmforge.io: everything fsynced before it lands, a crash at any
moment leaves the old folder or the new one whole, and the next write repairs what a
crash left (an old folder moved aside is put back, a temp folder removed)."""

from __future__ import annotations

import os
import random
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from fs_faults import break_dir_renames

import lmforge.io as lio
from lmforge import LmforgeError
from lmforge.io import atomic_dir, atomic_file, atomic_output_dir, recover_leftovers, remove_dir


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def tree(root: Path) -> dict[str, str]:
    """Every file under `root` (relative posix path -> text)."""
    return {p.relative_to(root).as_posix(): p.read_text() for p in sorted(root.rglob("*")) if p.is_file()}


def write_tree(root: Path, version: str) -> None:
    (root / "a" / "b").mkdir(parents=True, exist_ok=True)
    for rel in ("top.txt", "a/mid.txt", "a/b/deep.txt"):
        (root / rel).write_text(version)


WANT_V1 = {"top.txt": "v1", "a/mid.txt": "v1", "a/b/deep.txt": "v1"}
WANT_V2 = {"top.txt": "v2", "a/mid.txt": "v2", "a/b/deep.txt": "v2"}


@pytest.fixture(params=[True, False], ids=["exchange", "two-renames"])
def swap(request, monkeypatch):
    """Run a test with the atomic exchange (where the system has it) and with the
    two-rename fallback of systems that cannot exchange two folders."""
    if not request.param:
        monkeypatch.setattr(lio, "_exchange", lambda a, b: False)
    return request.param


def _ident(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


# --- durability -------------------------------------------------------------------------
def test_every_file_and_folder_of_the_tree_is_fsynced_before_it_lands(tmp_path, monkeypatch):
    out = tmp_path / "out"
    synced: list[tuple[int, int]] = []
    real_fsync, real_swap = os.fsync, lio._swap_in
    at_swap: dict[str, list] = {}

    def recording_fsync(fd):
        st = os.fstat(fd)
        synced.append((st.st_dev, st.st_ino))
        return real_fsync(fd)

    def recording_swap(tmp, dst):
        at_swap["synced"] = list(synced)
        at_swap["tmp"] = tmp
        return real_swap(tmp, dst)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(lio, "_swap_in", recording_swap)
    with atomic_dir(out) as tmp:
        write_tree(tmp, "v1")
        (tmp / "empty").mkdir()
        (tmp / "link").symlink_to(tmp_path / "elsewhere")  # dangling: never followed
    assert tree(out) == WANT_V1
    # inodes survive the rename: what was synced in the temp folder is what landed
    files = [out / "top.txt", out / "a" / "mid.txt", out / "a" / "b" / "deep.txt"]
    folders = [out, out / "a", out / "a" / "b", out / "empty"]
    before = set(at_swap["synced"])
    for p in files + folders:
        assert _ident(p) in before, f"{p.relative_to(tmp_path)} was not fsynced before the swap"
    # a folder's entries are synced after the files in it
    order = at_swap["synced"]
    assert order.index(_ident(out / "a" / "b")) > order.index(_ident(out / "a" / "b" / "deep.txt"))
    assert order.index(_ident(out)) > order.index(_ident(out / "a"))
    # and the rename itself is made durable in the parent
    assert _ident(tmp_path) in synced[len(order):]


def test_a_file_that_cannot_be_synced_fails_the_write(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")

    def failing_fsync(fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="Input/output"):
        with atomic_dir(out) as tmp:
            (tmp / "new.txt").write_text("new")
    assert tree(out) == {"keep.txt": "old"} and hidden(tmp_path) == []


# --- replacing and failing --------------------------------------------------------------
def test_a_folder_is_replaced_whole(tmp_path, swap):
    out = tmp_path / "out"
    with atomic_dir(out) as tmp:
        write_tree(tmp, "v1")
        (tmp / "only-in-v1.txt").write_text("x")
    with atomic_dir(out) as tmp:
        write_tree(tmp, "v2")
    assert tree(out) == WANT_V2
    assert hidden(tmp_path) == []
    # a file where the folder should go is replaced as well
    (tmp_path / "file").write_text("not a folder")
    with atomic_dir(tmp_path / "file") as tmp:
        write_tree(tmp, "v1")
    assert tree(tmp_path / "file") == WANT_V1 and hidden(tmp_path) == []


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()])
def test_an_error_in_the_block_leaves_the_folder_as_it_was(tmp_path, error):
    out = tmp_path / "out"
    with atomic_dir(out) as tmp:
        write_tree(tmp, "v1")
    with pytest.raises(type(error)):
        with atomic_dir(out) as tmp:
            write_tree(tmp, "v2")
            raise error
    assert tree(out) == WANT_V1 and hidden(tmp_path) == []
    with pytest.raises(type(error)):
        with atomic_dir(tmp_path / "new") as tmp:
            raise error
    assert not (tmp_path / "new").exists() and hidden(tmp_path) == []


def test_a_failed_swap_puts_the_old_folder_back_at_once(tmp_path, monkeypatch):
    """An error (not a crash) between the two renames of the fallback: the old folder
    goes straight back, nothing is left for a later repair."""
    out = tmp_path / "out"
    with atomic_dir(out) as tmp:
        write_tree(tmp, "v1")
    break_dir_renames(monkeypatch, from_call=2, crash=False)
    with pytest.raises(OSError, match="rename refused"):
        with atomic_dir(out) as tmp:
            write_tree(tmp, "v2")
    assert tree(out) == WANT_V1 and hidden(tmp_path) == []


def test_missing_parent_folders_are_created(tmp_path):
    out = tmp_path / "x" / "y" / "out"
    with atomic_dir(out) as tmp:
        write_tree(tmp, "v1")
    assert tree(out) == WANT_V1


# --- repairing what a crash left ------------------------------------------------------------
def test_an_old_folder_left_mid_swap_is_restored_when_the_new_one_never_landed(tmp_path, monkeypatch):
    out = tmp_path / "out"
    with atomic_output_dir(out) as tmp:
        write_tree(tmp, "v1")
    real_replace = os.replace
    break_dir_renames(monkeypatch, from_call=2, crash=True)
    with pytest.raises(OSError, match="simulated crash"):
        with atomic_output_dir(out, overwrite=True) as tmp:
            write_tree(tmp, "v2")
    monkeypatch.setattr(os, "replace", real_replace)
    assert not out.exists()
    (old,) = hidden(tmp_path)
    assert old.startswith(".out.old-")
    # a hard kill skips the cleanup too: a half-written temp folder beside it
    half = tmp_path / ".out.tmp-4242-deadbeef"
    write_tree(half, "v2")
    (half / "top.txt").unlink()

    # the next use puts the old folder back first, so it is refused as existing...
    with pytest.raises(LmforgeError, match="already exists"):
        with atomic_output_dir(out) as tmp:
            pytest.fail("refused before the block")
    assert tree(out) == WANT_V1 and hidden(tmp_path) == []
    # ...and replaced as usual with overwrite
    with atomic_output_dir(out, overwrite=True) as tmp:
        write_tree(tmp, "v2")
    assert tree(out) == WANT_V2 and hidden(tmp_path) == []


def test_an_old_folder_left_after_the_new_one_landed_is_deleted(tmp_path):
    out = tmp_path / "out"
    write_tree(out, "v2")
    write_tree(tmp_path / ".out.old-1-abcd", "v1")
    write_tree(tmp_path / ".out.old", "v1")  # the earlier atomic_output_dir's name
    recover_leftovers(tmp_path, "out")
    assert tree(out) == WANT_V2 and hidden(tmp_path) == []


def test_leftover_temp_and_deleted_folders_are_removed_and_nothing_else(tmp_path):
    out = tmp_path / "out"
    for name in (".out.tmp-4242-deadbeef", ".out.del-4242-deadbeef", ".out.abc_1234.tmp"):  # the last: mkdtemp's, before
        write_tree(tmp_path / name, "v1")
    unrelated = [".other.tmp-1-ab", ".out.notes", ".output.tmp-1-ab"]
    write_tree(tmp_path / unrelated[0], "v1")
    (tmp_path / unrelated[1]).write_text("mine")
    write_tree(tmp_path / unrelated[2], "v1")
    (tmp_path / ".out.abcd1234.tmp").write_text("a temp file of atomic_file: not a folder write's")
    unrelated.append(".out.abcd1234.tmp")
    with atomic_output_dir(out) as tmp:
        write_tree(tmp, "v1")
    assert tree(out) == WANT_V1
    assert hidden(tmp_path) == sorted(unrelated)
    recover_leftovers(tmp_path / "nowhere", "out")  # a missing folder has nothing to repair


def test_remove_dir_hides_before_deleting(tmp_path, monkeypatch):
    folder = tmp_path / "gone"
    write_tree(folder, "v1")
    seen = []
    real_rmtree = lio.shutil.rmtree

    def rmtree(path, *a, **k):
        seen.append(Path(path).name)
        return real_rmtree(path, *a, **k)

    monkeypatch.setattr(lio.shutil, "rmtree", rmtree)
    remove_dir(folder)
    assert not folder.exists() and hidden(tmp_path) == []
    assert len(seen) == 1 and seen[0].startswith(".gone.del-")
    remove_dir(folder)  # already gone: nothing to do


# --- atomic_output_dir --------------------------------------------------------------------
def test_an_existing_folder_is_refused_without_overwrite(tmp_path):
    out = tmp_path / "out"
    write_tree(out, "v1")
    with pytest.raises(LmforgeError, match=r"output folder .*out already exists; choose another --out or pass --overwrite"):
        with atomic_output_dir(out) as tmp:
            pytest.fail("refused before the block")
    assert tree(out) == WANT_V1 and hidden(tmp_path) == []
    (tmp_path / "file").write_text("x")
    with pytest.raises(LmforgeError, match="already exists"):
        with atomic_output_dir(tmp_path / "file"):
            pass
    with atomic_output_dir(out, overwrite=True) as tmp:
        write_tree(tmp, "v2")
    assert tree(out) == WANT_V2 and hidden(tmp_path) == []


def test_an_empty_folder_is_refused_too_and_replaced_with_overwrite(tmp_path):
    """The caller decides what an existing folder means (the adapter writer replaces an empty one)."""
    (tmp_path / "out").mkdir()
    with pytest.raises(LmforgeError, match="already exists"):
        with atomic_output_dir(tmp_path / "out"):
            pass
    with atomic_output_dir(tmp_path / "out", overwrite=True) as tmp:
        write_tree(tmp, "v1")
    assert tree(tmp_path / "out") == WANT_V1 and hidden(tmp_path) == []


def test_the_new_folder_gets_ordinary_permissions(tmp_path):
    """Not mkdtemp's private 0700: the folder is an output others may read."""
    with atomic_output_dir(tmp_path / "out") as tmp:
        write_tree(tmp, "v1")
    umask = os.umask(0o022)
    os.umask(umask)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o777 & ~umask


# --- hard kills -----------------------------------------------------------------------------
WRITER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    import lmforge.io as lio
    if sys.argv[2] == "two-renames":
        lio._exchange = lambda a, b: False
    out, n = Path(sys.argv[1]), 0
    print("ready", flush=True)
    while True:
        n += 1
        with lio.atomic_dir(out) as tmp:
            for i in range(20):
                (tmp / f"f{i}").write_text(str(n) * (1 + 997 * i))
            (tmp / "sub").mkdir()
            (tmp / "sub" / "last").write_text(str(n))
    """
)


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
@pytest.mark.parametrize("mode", ["exchange", "two-renames"])
def test_a_kill_at_any_moment_leaves_one_whole_folder(tmp_path, mode):
    out = tmp_path / "out"
    with atomic_dir(out) as tmp:
        (tmp / "first").write_text("0")
    rng = random.Random(0)
    for _ in range(3):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(out), mode], stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout.readline().strip() == "ready"
            time.sleep(rng.uniform(0.05, 0.3))
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            proc.stdout.close()
        recover_leftovers(tmp_path, "out")
        assert hidden(tmp_path) == []
        files = tree(out)
        if files != {"first": "0"}:
            n = files["sub/last"]
            assert sorted(files) == sorted([f"f{i}" for i in range(20)] + ["sub/last"])
            assert all(files[f"f{i}"] == n * (1 + 997 * i) for i in range(20)), "a folder mixing two writes"


# --- permissions ------------------------------------------------------------------------
@pytest.fixture(params=[0o022, 0o077], ids=["umask022", "umask077"])
def umask(request):
    """Run a test under a umask (put back after it)."""
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def modes(root: Path) -> dict[str, int]:
    """Permission bits of `root` and everything under it (relative posix path -> mode)."""
    return {p.relative_to(root).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in [root, *sorted(root.rglob("*"))]}


def expected_modes(root: Path, mask: int) -> dict[str, int]:
    return {p.relative_to(root).as_posix(): (0o777 if p.is_dir() else 0o666) & ~mask for p in [root, *sorted(root.rglob("*"))]}


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_the_umask_is_read_without_changing_it(umask):
    assert lio.umask() == umask and lio.new_file_mode() == 0o666 & ~umask
    assert os.umask(umask) == umask  # still the one the test set


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_written_files_and_folders_get_the_modes_of_the_umask(tmp_path, umask):
    """Not the 0600 of a temporary file: a model, a checkpoint, a tokenizer and a data folder
    are readable by whoever the user's umask lets read them (0644 / 0755 under umask 022)."""
    import torch
    from data_fixtures import small_tokenizer, write_texts

    from lmforge.config import Config
    from lmforge.data.prepare import prepare
    from lmforge.model import GPT
    from lmforge.train.checkpoint import save_checkpoint
    from lmforge.weights import save_pretrained, state_dict_for_saving

    tok = small_tokenizer()
    model = GPT(Config.from_name("nano", vocab_size=tok.vocab_size, context_length=16, n_layer=1, n_embd=32, n_head=2,
                                 n_kv_head=1, mlp_hidden=64))
    with atomic_file(tmp_path / "one.txt") as f:
        f.write(b"x")
    save_pretrained(model, tmp_path / "model", tokenizer=tok)
    checkpoint = save_checkpoint(tmp_path / "run", 1, config=model.config, model_state=state_dict_for_saving(model),
                                 tokenizer=tok, optimizer_state=torch.optim.AdamW(model.parameters()).state_dict())
    tok.save(tmp_path / "tok")
    write_texts(tmp_path / "corpus", ["one text.", "another text."])
    prepare([tmp_path / "corpus"], tok, tmp_path / "data", val_fraction=0.5)
    assert stat.S_IMODE((tmp_path / "one.txt").stat().st_mode) == 0o666 & ~umask
    for folder in (tmp_path / "model", tmp_path / "run", checkpoint, tmp_path / "tok", tmp_path / "data"):
        assert len(modes(folder)) > 1
        got, want = modes(folder), expected_modes(folder, umask)
        assert {k: oct(v) for k, v in got.items()} == {k: oct(v) for k, v in want.items()}, folder
