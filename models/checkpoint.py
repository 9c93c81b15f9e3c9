"""The one checkpoint loader (and atomic writer) of ``models/``: every file we read goes through here, under one
policy.

Policy: **nothing is ever unpickled with code execution.** Every load is ``torch.load(weights_only=True)``: tensors,
numbers, strings, ``None`` and plain containers (dict / list / tuple / OrderedDict), plus the exact extra types a
caller names in ``allow``. Our own files (``model.pt``, ``last.pt``, the classifier and encoder caches) need no extra
type at all (``OWN_TYPES`` is empty: checked by saving and loading each kind, and pinned by
``tests/test_reliability.py``). LlamaGen's training checkpoints also pickle their ``argparse.Namespace``: load those
with ``allow=LLAMAGEN_TYPES``. There is deliberately no switch to turn the policy off.

API::

    from models.checkpoint import load_checkpoint, atomic_save, CheckpointError

    obj = load_checkpoint(path, *, map_location="cpu", allow=(), what="checkpoint")
        # -> whatever the file holds (usually a dict). ``allow``: extra classes/functions the file may name
        # (e.g. ``allow=(argparse.Namespace,)``); ``what`` names the file kind in error messages ("--ckpt", "VQ
        # checkpoint", ...).
    require_keys(obj, path, keys, what)   # CheckpointError unless obj is a dict holding every key in ``keys``
    atomic_save(obj, path)                # torch.save to ``path.tmp.<pid>``, fsync, os.replace: a kill at any
                                          # moment leaves the previous file intact and loadable
    clean_stale_tmp(path)                 # remove ``path.tmp.*`` left by killed writers (not live processes')
    truncate_log(path, step)              # a JSON-lines log cut back to the rows of steps <= step (on resume)

    # Sharded (FSDP) checkpoints: a torch.distributed.checkpoint directory, tensors only, plus ``meta.pt``
    atomic_save_sharded(state, meta, path)  # collective: every rank's shards -> ``path.tmp.<pid>``, then swapped in
    load_sharded(state, path)             # collective: fill ``state``'s (D)Tensors in place, resharded if need be
    load_sharded_meta(path)               # ``meta`` (load_checkpoint of ``path/meta.pt``)
    read_sharded(path)                    # the whole checkpoint as full CPU tensors, one process, no process group
    recover_sharded(path); clean_stale_sharded(path)   # undo a swap cut by a kill; remove dead writers' temp dirs

DCP itself unpickles its ``.metadata`` with a bare ``pickle.load`` and non-tensor entries with
``torch.load`` with weights_only off; here the metadata goes through an allow-list of DCP's own metadata types (refused
before anything is built, like a torch file) and non-tensor entries are neither written nor read.

Errors (all name the file):

- :class:`CheckpointNotFoundError` (a ``FileNotFoundError``): no such file.
- :class:`UnsafeCheckpointError`: the file would need a type outside the allow-list (e.g. ``posix.system``, the
  usual code-execution payload, or a whole pickled ``nn.Module``); it names the type and is raised *before* anything
  is unpickled when the file is torch's zip format (its pickle is scanned, not run).
- :class:`CheckpointError`: an empty, truncated or corrupt file, a directory, or a file that is not a torch
  checkpoint at all. ``CheckpointError`` subclasses both ``RuntimeError`` and ``ValueError`` so that callers'
  existing ``except`` clauses for either keep working.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import pickle
import re
import zipfile
from typing import Any, Iterable, Sequence

import torch

# The non-tensor types our own files need beyond torch's weights_only defaults: none (see the module docstring).
OWN_TYPES: tuple = ()
# LlamaGen training checkpoints (GPT and VQ) store the run's argparse.Namespace next to the weights.
LLAMAGEN_TYPES: tuple = (argparse.Namespace,)

_WHY = ("unpickling an arbitrary type can run arbitrary code, so checkpoints are loaded with "
        "torch.load(weights_only=True) and only tensors, numbers, strings and plain containers are accepted")


class CheckpointError(RuntimeError, ValueError):
    """A file that cannot be used as a checkpoint (the message names the file and why)."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No file at the given path."""


class UnsafeCheckpointError(CheckpointError):
    """The file names a type outside the allow-list: refused, never unpickled."""

    def __init__(self, message: str, types: Sequence[str] = ()):
        super().__init__(message)
        self.types = list(types)


def _type_name(obj) -> str:
    return f"{obj.__module__}.{getattr(obj, '__qualname__', obj.__name__)}"


def _unsafe(path: str, types: Iterable[str], what: str) -> UnsafeCheckpointError:
    types = sorted(set(types))
    return UnsafeCheckpointError(
        f"refusing to load {what} {path!r}: it needs {', '.join(types)}, which is not an allowed type ({_WHY}). "
        f"Our own checkpoints never contain such types; if you trust this file, re-save just its tensors "
        f"(a state_dict) and load that.", types)


def load_checkpoint(path: str, *, map_location="cpu", allow: Sequence = (), what: str = "checkpoint") -> Any:
    """Load ``path`` under the one policy (module docstring): ``torch.load(weights_only=True)`` with ``OWN_TYPES``
    plus ``allow`` as the only extra types. Raises :class:`CheckpointNotFoundError`, :class:`UnsafeCheckpointError`
    or :class:`CheckpointError` with a message naming the file."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointNotFoundError(f"{what} not found: {path!r} (no such file)")
    if os.path.isdir(path):
        raise CheckpointError(f"{what} {path!r} is a directory, not a checkpoint file")
    size = os.path.getsize(path)
    if size == 0:
        raise CheckpointError(f"{what} {path!r} is empty (0 bytes): an interrupted copy or download?")
    allowed = tuple(OWN_TYPES) + tuple(allow)
    intact_zip = False  # a zip archive whose pickle could be scanned: a later failure is not damage
    if zipfile.is_zipfile(path):
        # torch's zip format: scan the pickle's GLOBAL opcodes without executing anything, so an unsafe file is
        # refused with the exact types it names before a single object is built.
        try:
            needed = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception as exc:  # a damaged archive: torch.load below reports it with its own words
            needed = []
            scan_error = exc
        else:
            scan_error = None
        extra = set(needed) - {_type_name(t) for t in allowed}
        if extra:
            raise _unsafe(path, extra, what)
        if scan_error is not None:
            raise CheckpointError(f"{what} {path!r} is truncated or corrupt: a zip archive torch cannot read "
                                  f"({type(scan_error).__name__}: {str(scan_error)[:200]})") from scan_error
        intact_zip = True
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        message = str(exc)
        names = re.findall(r"GLOBAL ([\w.]+)", message) or _pickle_globals(path)
        extra = set(names) - {_type_name(t) for t in allowed}
        if extra:
            raise _unsafe(path, extra, what) from exc
        detail = message.split("\n\n")[-2].strip() if message.count("\n\n") >= 2 else message[:200]
        raise CheckpointError(f"refusing to load {what} {path!r}: its pickle uses something weights_only loading "
                              f"does not accept ({detail}); {_WHY}") from exc
    except Exception as exc:  # torch raises EOFError, KeyError, RuntimeError, ... for damaged or foreign files
        with open(path, "rb") as f:
            head = f.read(8)
        kind = ("intact but could not be loaded" if intact_zip  # e.g. map_location names a missing device
                else "truncated or corrupt" if head.startswith(b"PK") or head[:1] == b"\x80"
                else f"corrupt or not a torch checkpoint (it starts with {head!r})")
        raise CheckpointError(f"{what} {path!r} is {kind}: {type(exc).__name__}: {str(exc)[:200]}") from exc


def _pickle_globals(path: str) -> list:
    """The ``module.name`` globals a plain (non-zip) pickle file refers to, read with ``pickletools`` (nothing is
    executed): names the offending type when torch's unpickler stops at an opcode instead of at the global."""
    import pickletools

    names, strings = [], []
    try:
        with open(path, "rb") as f:
            for op, arg, _ in pickletools.genops(f):
                if op.name == "GLOBAL":
                    names.append(str(arg).replace(" ", "."))
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    names.append(f"{strings[-2]}.{strings[-1]}")
                elif isinstance(arg, str):
                    strings.append(arg)
    except Exception:  # a damaged pickle: report what was read before the damage
        pass
    return names


def require_keys(obj, path: str, keys: Iterable[str], what: str = "checkpoint") -> dict:
    """``obj`` if it is a dict holding every key in ``keys``, else a :class:`CheckpointError` that lists what the
    file holds instead."""
    keys = list(keys)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path!r} is not a {what}: it holds a {type(obj).__name__}, not a dict with "
                              f"{keys}")
    missing = [k for k in keys if k not in obj]
    if missing:
        raise CheckpointError(f"{path!r} is not a {what}: no {missing} (its keys: {sorted(map(str, obj))[:8]})")
    return obj


def atomic_save(obj, path: str) -> None:
    """``torch.save(obj, path)`` atomically: write ``path.tmp.<pid>``, flush it to disk, then rename over ``path``.
    A kill at any moment leaves either the old file or the new one, never a torn one."""
    path = os.fspath(path)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def clean_stale_tmp(path: str) -> list:
    """Remove ``path.tmp.<pid>`` files whose writer is gone (killed mid-write) or is this process; returns the
    removed paths. A live writer's file is left alone."""
    removed = []
    for tmp in glob.glob(glob.escape(os.fspath(path)) + ".tmp.*"):
        suffix = tmp.rsplit(".", 1)[-1]
        if suffix.isdigit() and int(suffix) != os.getpid() and _pid_alive(int(suffix)):
            continue
        try:
            os.remove(tmp)
            removed.append(tmp)
        except FileNotFoundError:
            pass
    return removed


def truncate_log(path: str, step: int) -> int:
    """Cut the JSON-lines log ``path`` back to what a checkpoint at ``step`` has seen: rows with ``"step" > step``
    (logged after the checkpoint by a run that was then killed; the resumed run logs them again) and a torn last
    line are dropped, rows without a step (headers) kept. Rewritten atomically; returns the number of rows dropped.
    """
    if not os.path.isfile(path):
        return 0
    kept, dropped = [], 0
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:  # half-written when the process died
                dropped += 1
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), (int, float)) and row["step"] > step:
                dropped += 1
                continue
            kept.append(line if line.endswith("\n") else line + "\n")
    if dropped:
        tmp = f"{path}.tmp.{os.getpid()}"
        with open(tmp, "w") as f:
            f.writelines(kept)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    return dropped


# ---------------------------------------------------------------------------------------------------------------
# Sharded checkpoints (FSDP): a torch.distributed.checkpoint (DCP) directory, written atomically, read safely
# ---------------------------------------------------------------------------------------------------------------

SHARDED_META = "meta.pt"  # the non-tensor state beside the shards (torch.save; read by load_checkpoint)

# Everything DCP's ``.metadata`` pickle names (torch 2.x: the storage layout of every tensor), and nothing else:
# plain data classes, torch.Size, dtypes and layouts, a path. DCP itself reads that file with a bare pickle.load
# (code execution from a crafted file); :func:`_read_dcp_metadata` reads it with this allow-list instead.
_DCP_METADATA_TYPES = frozenset({
    ("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
        "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")
} | {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
     ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"), ("pathlib", "PosixPath"),
     ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"), ("pathlib", "PureWindowsPath")})


def _read_dcp_metadata(path: str, what: str):
    """DCP's ``.metadata`` of the checkpoint directory ``path``, unpickled with only the types it needs
    (``_DCP_METADATA_TYPES`` and torch dtypes): anything else is refused before it is built."""
    meta_path = os.path.join(path, ".metadata")
    if not os.path.isfile(meta_path):
        raise CheckpointError(f"{what} {path!r} is not a complete sharded checkpoint: no .metadata")
    refused = []

    class Restricted(pickle.Unpickler):
        def find_class(self, module, name):
            if (module, name) in _DCP_METADATA_TYPES or (
                    module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
                return super().find_class(module, name)
            refused.append(f"{module}.{name}")
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed")

    try:
        with open(meta_path, "rb") as f:
            return Restricted(f).load()
    except Exception as exc:
        if refused:
            raise _unsafe(meta_path, refused, what) from exc
        raise CheckpointError(f"{what} {meta_path!r} is truncated or corrupt: {type(exc).__name__}: "
                              f"{str(exc)[:200]}") from exc


def _dcp_reader(path: str, what: str):
    """A DCP ``FileSystemReader`` whose metadata is read (now: an unsafe file is refused before DCP starts) by
    :func:`_read_dcp_metadata`."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    checked = _read_dcp_metadata(path, what)

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            if kwargs.get("rank") is not None:
                raise CheckpointError(f"{what} {path!r}: per-rank metadata files are not read")
            metadata = checked
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(path)


def _tensors_only_planner(base):
    """A DCP load planner that refuses pickled ("bytes") entries: DCP loads those with
    ``torch.load`` with weights_only off; our sharded checkpoints hold tensors only (:func:`atomic_save_sharded`)."""

    class TensorsOnly(base):
        def load_bytes(self, read_item, value):
            raise UnsafeCheckpointError(f"refusing a pickled entry {read_item.dest_index.fqn!r} in a sharded "
                                        f"checkpoint ({_WHY})", [read_item.dest_index.fqn])

    return TensorsOnly


def _flat_items(tree, prefix=""):
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _flat_items(value, f"{prefix}{key}.")
    else:
        yield prefix[:-1], tree


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_save_sharded(state: dict, meta: dict, path: str) -> None:
    """Write a sharded checkpoint directory ``path`` atomically. A collective: every rank of the default process
    group calls it with its own ``state`` (nested dicts of tensors / DTensors, e.g. FSDP2's sharded state dicts:
    each rank writes its shards, replicated tensors once); ``meta`` (rank 0's is kept) is the non-tensor state,
    saved beside the shards as ``meta.pt`` (``torch.save``; plain types and tensors, read back with
    :func:`load_checkpoint`). Written to ``path.tmp.<pid of rank 0>``, flushed to disk, then swapped in with two
    renames (``path`` -> ``path.old.<pid>``, tmp -> ``path``): a kill at any moment leaves the previous checkpoint
    or the new one (:func:`recover_sharded` undoes a swap cut between its renames). Non-tensor values in ``state``
    are refused: DCP would pickle them and unpickle them with code execution on load. Every rank must see the same
    file system at ``path``."""
    import shutil

    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    path = os.fspath(path).rstrip(os.sep)
    for key, value in _flat_items(state):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"atomic_save_sharded: {key!r} is a {type(value).__name__}, not a tensor (non-tensor "
                            f"state goes in meta, which is saved weights_only-loadable)")
    rank = dist.get_rank()
    owner = [os.getpid()]
    dist.broadcast_object_list(owner, src=0)
    tmp, old = f"{path}.tmp.{owner[0]}", f"{path}.old.{owner[0]}"
    if rank == 0:
        for leftover in (tmp, old):
            if os.path.isdir(leftover):
                shutil.rmtree(leftover)
        os.makedirs(tmp)
    dist.barrier()
    try:
        dcp.save(state, checkpoint_id=tmp)  # FileSystemWriter fsyncs every file it writes
        if rank == 0:
            with open(os.path.join(tmp, SHARDED_META), "wb") as f:
                torch.save(meta, f)
                f.flush()
                os.fsync(f.fileno())
            _fsync_dir(tmp)
        dist.barrier()  # every rank's shards are on disk before the swap
        if rank == 0:
            if os.path.isdir(path):
                os.rename(path, old)
            os.rename(tmp, path)
            _fsync_dir(os.path.dirname(os.path.abspath(path)))
            if os.path.isdir(old):
                shutil.rmtree(old)
    except BaseException:
        if rank == 0 and os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    dist.barrier()  # nobody reads or writes ``path`` again before the swap is done


def recover_sharded(path: str) -> bool:
    """If a writer was killed between the two renames of :func:`atomic_save_sharded` (no ``path``, a
    ``path.old.<pid>`` of a dead process), put the previous checkpoint back at ``path``; returns whether it did."""
    path = os.fspath(path).rstrip(os.sep)
    if os.path.exists(path):
        return False
    for old in sorted(glob.glob(glob.escape(path) + ".old.*"), key=os.path.getmtime, reverse=True):
        suffix = old.rsplit(".", 1)[-1]
        if suffix.isdigit() and int(suffix) != os.getpid() and _pid_alive(int(suffix)):
            continue
        os.rename(old, path)
        return True
    return False


def clean_stale_sharded(path: str) -> list:
    """Remove ``path.tmp.<pid>`` / ``path.old.<pid>`` directories of dead writers (or this process); returns them.
    Call :func:`recover_sharded` first (it may still need an ``old`` one)."""
    import shutil

    removed = []
    path = os.fspath(path).rstrip(os.sep)
    for leftover in glob.glob(glob.escape(path) + ".tmp.*") + glob.glob(glob.escape(path) + ".old.*"):
        suffix = leftover.rsplit(".", 1)[-1]
        if suffix.isdigit() and int(suffix) != os.getpid() and _pid_alive(int(suffix)):
            continue
        shutil.rmtree(leftover, ignore_errors=True)
        removed.append(leftover)
    return removed


def load_sharded_meta(path: str, what: str = "sharded checkpoint") -> Any:
    """The non-tensor state (``meta``) of the sharded checkpoint directory ``path``, via :func:`load_checkpoint`."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        if os.path.exists(path):
            raise CheckpointError(f"{what} {path!r} is a file, not a sharded checkpoint directory")
        raise CheckpointNotFoundError(f"{what} not found: {path!r} (no such directory)")
    return load_checkpoint(os.path.join(path, SHARDED_META), what=what)


def load_sharded(state: dict, path: str, what: str = "sharded checkpoint") -> None:
    """Fill ``state`` (nested dicts of tensors / DTensors, the structure it was saved with) in place from the
    sharded checkpoint directory ``path``. A collective under a process group (every rank calls it); DTensors are
    resharded to the current layout, so another world size than the writer's loads too. Only tensors are read:
    the metadata with the allow-list of :func:`_read_dcp_metadata`, pickled entries refused."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    if not os.path.isdir(path):
        raise CheckpointNotFoundError(f"{what} not found: {path!r} (no such directory)")
    reader = _dcp_reader(path, what)
    try:
        dcp.load(state, storage_reader=reader, planner=_tensors_only_planner(DefaultLoadPlanner)())
    except CheckpointError:
        raise
    except Exception as exc:  # DCP wraps rank failures in CheckpointException
        if "UnsafeCheckpointError" in str(exc) or "refusing" in str(exc):
            raise UnsafeCheckpointError(f"{what} {path!r}: {str(exc)[:400]}") from exc
        raise CheckpointError(f"{what} {path!r} could not be loaded: {type(exc).__name__}: {str(exc)[:400]}") from exc


def read_sharded(path: str, what: str = "sharded checkpoint") -> dict:
    """The whole sharded checkpoint ``path`` as nested dicts of full (unsharded) CPU tensors, in one process and
    without a process group (inspection, tests, conversion); read as safely as :func:`load_sharded`."""
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    if not os.path.isdir(path):
        raise CheckpointNotFoundError(f"{what} not found: {path!r} (no such directory)")
    state: dict = {}
    reader = _dcp_reader(path, what)
    try:
        _load_state_dict(state, storage_reader=reader,
                         planner=_tensors_only_planner(_EmptyStateDictLoadPlanner)(), no_dist=True)
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"{what} {path!r} could not be read: {type(exc).__name__}: {str(exc)[:400]}") from exc
    return state
