"""The audit log's Merkle tree on disk: leaves are the log's lines, it survives restarts and
rotation, a rebuild gives the same root, a deleted or damaged tree is rebuilt at start."""

from __future__ import annotations

import base64
import os
import shutil
from pathlib import Path

import pytest

from qpher_proxy.audit import AuditLog, rotated_files
from qpher_proxy.audit.merkle import MemoryTree, ProofError, verify_consistency, verify_inclusion
from qpher_proxy.audit.tree import (
    NODES_FILE,
    TreeStore,
    iter_log_lines,
    leaves_in,
    node_count,
    node_position,
    tree_dir,
)


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


@pytest.mark.parametrize("damage", ["delete", "torn_write", "garbage", "cut_back", "flip_last"])
def test_a_deleted_or_damaged_tree_is_rebuilt_at_start(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "audit.log"
    with AuditLog(path, rotate_bytes=3000) as log:
        _fill(log, 50)
    ref = _expected(path)
    nodes = os.path.join(tree_dir(path), NODES_FILE)
    if damage == "delete":
        shutil.rmtree(tree_dir(path))
    elif damage == "torn_write":  # the last leaf's write cut short
        os.truncate(nodes, os.path.getsize(nodes) - 40)
    elif damage == "garbage":
        with open(nodes, "ab") as fh:
            fh.write(b"x" * 70)
    elif damage == "cut_back":  # an older copy of the tree
        os.truncate(nodes, node_count(20) * 32)
    else:
        with open(nodes, "r+b") as fh:
            fh.seek(node_position(0, 49) * 32)
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


def test_rebuild_gives_the_same_file(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    with AuditLog(path) as log:
        _fill(log, 37)
    nodes = Path(tree_dir(path), NODES_FILE)
    before = nodes.read_bytes()
    store = TreeStore(tree_dir(path))
    store.rebuild([str(path)])
    store.close()
    assert nodes.read_bytes() == before and len(before) == node_count(37) * 32


def test_the_node_file_is_post_order(tmp_path: Path) -> None:
    store = TreeStore(str(tmp_path / "tree"))
    ref = MemoryTree()
    for i in range(100):
        h = MemoryTree.from_data([i.to_bytes(2, "big")]).node(0, 0)
        store.append(h)
        ref.append(h)
        assert store.size == i + 1 and leaves_in(node_count(i + 1)) == i + 1
    data = Path(tmp_path / "tree" / NODES_FILE).read_bytes()
    assert len(data) == node_count(100) * 32
    positions = set()
    for level, nodes in enumerate(ref.levels):
        for index, h in enumerate(nodes):
            pos = node_position(level, index)
            positions.add(pos)
            assert data[pos * 32:(pos + 1) * 32] == h == store.node(level, index)
    assert positions == set(range(node_count(100)))
    store.close()


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


def test_reload_cuts_a_torn_append_back_to_whole_leaves(tmp_path: Path) -> None:
    d = str(tmp_path / "tree")
    store = TreeStore(d)
    ref = MemoryTree()
    for i in range(70):
        h = MemoryTree.from_data([bytes([i])]).node(0, 0)
        store.append(h)
        ref.append(h)
    store.close()
    # leaf 63 completes 6 ancestors: its write is 7 nodes; keep the leaf and 2 of them, plus 5 bytes
    os.truncate(os.path.join(d, NODES_FILE), (node_count(63) + 3) * 32 + 5)
    store = TreeStore(d)
    assert store.size == 63 and store.root() == ref.root(63)
    assert os.path.getsize(os.path.join(d, NODES_FILE)) == node_count(63) * 32
    for i in range(63, 70):
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


def test_a_damaged_node_under_the_latest_checkpoint_is_found_at_start(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    with AuditLog(path) as log:
        _fill(log, 40)
        size, root = log.tree_head()
        log.record_checkpoint(size, root, f"o\n{size}\n{base64.b64encode(root).decode()}\n\n— o AAAA\n")
        _fill(log, 3)
    ref = _expected(path)
    with open(os.path.join(tree_dir(path), NODES_FILE), "r+b") as fh:
        fh.seek(node_position(3, 4) * 32)  # leaves 32..39: part of the roots at 40 and at 44
        fh.write(bytes(32))
    with AuditLog(path) as log:
        assert log.tree_head() == (ref.size, ref.root())
        assert log.root_at(size) == root
