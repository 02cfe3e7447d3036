"""Moving tensors onto 2 MB pages (`lmforge.engine.hugepages`): the values, views and
sharing survive, the memory is on huge pages where Linux gives them (read back from
/proc/self/smaps), and nothing moves where it does not."""

from __future__ import annotations

import pytest
import torch

from lmforge.engine import hugepages
from lmforge.engine.hugepages import HUGE_PAGE, huge_pages_available, move_to_huge_pages


def huge_kb_at(address: int) -> int:
    """AnonHugePages of the mapping holding `address`, from the kernel's own account."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5:
                start, end = (int(x, 16) for x in fields[0].split("-"))
                inside = start <= address < end
            elif fields[0] == "AnonHugePages:" and inside:
                return int(fields[1])
    raise AssertionError(f"no mapping holds {address:#x}")


def test_values_views_and_shared_storage_survive_the_move():
    base = torch.randn(3 * HUGE_PAGE // 4 + 123)  # not a whole number of pages
    view = base[1000:8000].view(-1, 7)[:, 2]  # an offset, strided view of the same storage
    expected_base, expected_view = base.clone(), view.clone()
    small = torch.randn(100)
    moved = move_to_huge_pages([base, view, small])
    assert torch.equal(base, expected_base) and torch.equal(view, expected_view)
    assert base.untyped_storage().data_ptr() == view.untyped_storage().data_ptr()  # still one storage
    view.fill_(2.0)  # still views of each other
    assert (base[1000:8000].view(-1, 7)[:, 2] == 2.0).all()
    if huge_pages_available():
        assert moved == base.untyped_storage().nbytes()  # once, and not the small one
        assert base.untyped_storage().data_ptr() % HUGE_PAGE == 0
        assert huge_kb_at(base.data_ptr()) * 1024 >= 2 * HUGE_PAGE  # at least its two whole pages are huge
    else:
        assert moved == 0


def test_nothing_moves_without_huge_pages(monkeypatch):
    monkeypatch.setattr(hugepages, "huge_pages_available", lambda: False)
    t = torch.randn(HUGE_PAGE)
    ptr = t.data_ptr()
    assert move_to_huge_pages([t]) == 0 and t.data_ptr() == ptr


@pytest.mark.skipif(not huge_pages_available(), reason="this machine gives no huge pages")
def test_the_moved_memory_is_freed_with_its_tensor():
    """The mapping goes when the last tensor on it does (no leak per compiled step)."""
    t = torch.randn(HUGE_PAGE)
    move_to_huge_pages([t])
    address = t.data_ptr()
    del t
    with pytest.raises(AssertionError, match="no mapping"):
        huge_kb_at(address)
