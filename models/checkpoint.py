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
