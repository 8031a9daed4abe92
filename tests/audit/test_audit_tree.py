"""The audit log's Merkle tree on disk: leaves are the log's lines, it survives restarts and
rotation, a rebuild gives the same root, a deleted or damaged tree is rebuilt at start."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from qpher_proxy.audit import AuditLog, rotated_files
from qpher_proxy.audit.merkle import MemoryTree, ProofError, verify_consistency, verify_inclusion
from qpher_proxy.audit.tree import TreeStore, iter_log_lines, tree_dir


def _files(path: Path) -> list[str]:
    return [p for _, p in rotated_files(path)] + [str(path)]


def _expected(path: Path) -> MemoryTree:
    return MemoryTree.from_data(iter_log_lines(_files(path)))


def _fill(log: AuditLog, n: int) -> None:
    for i in range(n):
        log.record("test.event", "info", n=i)


def test_leaves_are_the_lines_across_rotation_and_restarts(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    with AuditLog(path, rotate_bytes=2000) as log:
        _fill(log, 30)
    with AuditLog(path, rotate_bytes=2000) as log:
        _fill(log, 25)
        size, root = log.tree_head()
    assert len(rotated_files(path)) >= 3
    ref = _expected(path)
    assert (size, root) == (ref.size, ref.root()) and size == 55


def test_proofs_from_the_log_verify(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    with AuditLog(path) as log:
        _fill(log, 40)
        ref = _expected(path)
        for index, size in ((0, 1), (5, 17), (39, 40), (16, 33)):
            proof = log.inclusion_proof(index, size)
            verify_inclusion(index, size, ref.node(0, index), proof, ref.root(size))
        verify_consistency(13, 40, log.consistency_proof(13, 40), ref.root(13), ref.root(40))
        assert log.root_at(13) == ref.root(13)
        with pytest.raises(ProofError):
            log.inclusion_proof(0, 41)
        with pytest.raises(ProofError):
            log.consistency_proof(3, 41)


@pytest.mark.parametrize("damage", ["delete", "truncate_leaf", "garbage", "upper_level", "flip_last"])
def test_a_deleted_or_damaged_tree_is_rebuilt_at_start(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "audit.log"
    with AuditLog(path, rotate_bytes=3000) as log:
        _fill(log, 50)
    ref = _expected(path)
    d = tree_dir(path)
    if damage == "delete":
        shutil.rmtree(d)
    elif damage == "truncate_leaf":
        os.truncate(os.path.join(d, "level-00"), 32 * 20 + 5)
    elif damage == "garbage":
        with open(os.path.join(d, "level-00"), "ab") as fh:
            fh.write(b"x" * 70)
    elif damage == "upper_level":
        os.truncate(os.path.join(d, "level-02"), 32)
    else:
        with open(os.path.join(d, "level-00"), "r+b") as fh:
            fh.seek(49 * 32)
            fh.write(bytes(32))
    with AuditLog(path, rotate_bytes=3000) as log:
        assert log.tree_head() == (ref.size, ref.root())
        log.record("test.event", "info", n=99)
        assert log.tree_head() == (_expected(path).size, _expected(path).root())


def test_a_tree_one_line_behind_is_caught_up(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    with AuditLog(path) as log:
        _fill(log, 10)
    with AuditLog(path, tree=False) as log:  # a writer that crashed between the line and the tree
        _fill(log, 1)
    with AuditLog(path) as log:
        assert log.tree_head() == (_expected(path).size, _expected(path).root())


def test_two_writers_share_one_tree(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    with AuditLog(path, rotate_bytes=1500) as a, AuditLog(path, rotate_bytes=1500) as b:
        for i in range(20):
            (a if i % 3 else b).record("test.event", "info", n=i)
        assert a.tree_head() == b.tree_head() == (_expected(path).size, _expected(path).root())


def test_a_torn_line_becomes_a_leaf_when_terminated(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    with AuditLog(path) as log:
        _fill(log, 3)
    with open(path, "ab") as fh:
        fh.write(b'{"seq":4,"ts":"tor')
    with AuditLog(path) as log:
        size, root = log.tree_head()
    lines = list(iter_log_lines([str(path)]))
    assert lines[3] == b'{"seq":4,"ts":"tor' and b"audit.recovered" in lines[4]
    assert (size, root) == (5, MemoryTree.from_data(lines).root())


def test_rebuild_gives_the_same_levels(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    with AuditLog(path) as log:
        _fill(log, 37)
    d = tree_dir(path)
    before = {n: Path(d, n).read_bytes() for n in os.listdir(d) if n.startswith("level-")}
    store = TreeStore(d)
    store.rebuild([str(path)])
    store.close()
    after = {n: Path(d, n).read_bytes() for n in os.listdir(d) if n.startswith("level-")}
    assert {k: v for k, v in after.items() if v} == {k: v for k, v in before.items() if v}


def test_checkpoints_are_records_and_the_latest_note_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    with AuditLog(path) as log:
        _fill(log, 4)
        size, root = log.tree_head()
        log.record_checkpoint(size, root, f"o\n{size}\nnote\n\n")
        log.record_checkpoint(2, root, "o\n2\nolder\n\n")
        assert log.latest_checkpoint() == f"o\n{size}\nnote\n\n"
        assert log.tree_head()[0] == size + 2
    assert b'"event":"audit.checkpoint"' in path.read_bytes().splitlines()[4]


def test_reload_cuts_nodes_above_the_top_and_fills_missing_ones(tmp_path: Path) -> None:
    d = str(tmp_path / "tree")
    store = TreeStore(d)
    ref = MemoryTree()
    for i in range(70):
        h = MemoryTree.from_data([bytes([i])]).node(0, 0)
        store.append(h)
        ref.append(h)
    store.close()
    os.truncate(os.path.join(d, "level-00"), 20 * 32 + 7)  # 20 leaves and a torn node
    os.truncate(os.path.join(d, "level-02"), 32)  # 5 nodes missing there
    store = TreeStore(d)
    assert store.size == 20 and store.root() == ref.root(20)
    for level in range(8):
        p = os.path.join(d, f"level-{level:02d}")
        assert not os.path.exists(p) or os.path.getsize(p) == (20 >> level) * 32, level
    for i in range(20, 70):
        store.append(ref.node(0, i))
    assert store.root() == ref.root() and store.root(33) == ref.root(33)
    store.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give files to another user")
def test_run_as_root_the_tree_belongs_to_the_logs_owner(tmp_path: Path) -> None:
    d = tmp_path / "audit"
    d.mkdir()
    os.chown(d, 65534, 65534)
    with AuditLog(d / "audit.log") as log:
        _fill(log, 3)
    tree = Path(tree_dir(d / "audit.log"))
    assert {(p.stat().st_uid, p.stat().st_gid) for p in [tree, *tree.iterdir()]} == {(65534, 65534)}
