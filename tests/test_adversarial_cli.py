"""The command under hostile conditions (issue 10, points 10-13 and 17): special files as input or output,
faults during the write (ENOSPC, Ctrl-C, the input truncated by another process), long output names and
``--arch`` specs whose module misbehaves.

Every failing case checks the CLI contract: exit code 1, exactly one ``Error:`` line (or click's ``Aborted!``)
on stderr, no traceback, no output file, no temporary file in the output directory, the input's bytes
unchanged. Inputs are built on the fly in tmp_path; an alarm bounds every test (a FIFO must never hang).
"""

from __future__ import annotations

import errno
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import safetensors.torch
import torch
from click.testing import CliRunner, Result
from safetensors import SafetensorError
from torch import nn

from wsconvert.checkpoint import reader as ckpt
from wsconvert.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

TIME_LIMIT_S = 60  # per test; a hang (e.g. opening a FIFO) fails instead of blocking CI
SUBPROCESS_TIMEOUT_S = 90
ARCH = ["--arch", "wsc_adversarial_net:build"]

# Architecture modules importable during the tests (the directory is put on sys.path / PYTHONPATH).
ARCH_MODULES = {
    "wsc_adversarial_net": """
        from torch import nn

        def build():
            return nn.Sequential(nn.Conv2d(3, 64, 3), nn.BatchNorm2d(64), nn.ReLU(), nn.Conv2d(64, 128, 3),
                                 nn.BatchNorm2d(128))

        not_callable = 5
    """,
    "wsc_adversarial_raises": 'raise RuntimeError("broken at import\\nsecond line")\n',
    "wsc_adversarial_exits": "import sys\nsys.exit(3)\n",
    "wsc_adversarial_getattr": "def __getattr__(name):\n    raise LookupError(f'no {name} in here')\n",
}


def net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 64, 3), nn.BatchNorm2d(64), nn.ReLU(), nn.Conv2d(64, 128, 3), nn.BatchNorm2d(128))


@pytest.fixture(scope="module")
def arch_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("arch")
    for name, source in ARCH_MODULES.items():
        (directory / f"{name}.py").write_text(textwrap.dedent(source))
    return directory


@pytest.fixture(autouse=True)
def _bounded(arch_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.syspath_prepend(str(arch_dir))

    def expire(signum: int, frame: object) -> None:
        raise TimeoutError(f"test ran over {TIME_LIMIT_S} s (a hang?)")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(TIME_LIMIT_S)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# --- inputs and the contract ---------------------------------------------------------------------------


@dataclass
class Scene:
    """An input checkpoint in ``tmp/in`` and an empty output directory ``tmp/out``."""

    input: Path
    out: Path
    original: bytes

    @property
    def output(self) -> Path:
        return self.out / f"model.ws{self.input.suffix}"


def make_scene(tmp_path: Path, fmt: str = "zip") -> Scene:
    (tmp_path / "in").mkdir()
    (tmp_path / "out").mkdir()
    state_dict = net().state_dict()
    if fmt == "safetensors":
        path = tmp_path / "in" / "model.safetensors"
        safetensors.torch.save_file(state_dict, str(path))
    else:
        path = tmp_path / "in" / "model.pt"
        torch.save(state_dict, path, _use_new_zipfile_serialization=fmt == "zip")
    return Scene(path, tmp_path / "out", path.read_bytes())


def run(*args: object) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args], prog_name="wsconvert")


PROGRESS = ("loading ", "planning on ", "writing ")


def final_line(stderr: str, *, terminal: bool = False) -> str:
    """The one line stderr holds; on a terminal, after the progress phases (``\\r``-separated, each a known
    phase; click drops the ``\\x1b[K`` escape and CliRunner turns ``\\r\\n`` into ``\\n`` off a real terminal)."""
    assert "Traceback" not in stderr, stderr
    parts = [part for part in re.split(r"[\r\n]+", stderr) if part]
    assert parts, "nothing on stderr"
    if terminal:
        assert all(part.startswith(PROGRESS) for part in parts[:-1]), stderr
    else:
        assert len(parts) == 1 and stderr.endswith("\n"), stderr
    return parts[-1]


def assert_one_error(stderr: str, message: str, *, terminal: bool = False) -> None:
    line = final_line(stderr, terminal=terminal)
    assert line.startswith("Error: ") and message in line, stderr


def assert_aborted(stderr: str, *, terminal: bool = False) -> None:
    if not terminal:
        stderr = stderr.lstrip("\n")  # click prints a newline before Aborted!
    assert final_line(stderr, terminal=terminal) == "Aborted!", stderr


def assert_nothing_written(scene: Scene, *, input_changed: bool = False) -> None:
    assert sorted(p.name for p in scene.out.iterdir()) == [], "output or temporary file left behind"
    assert sorted(p.name for p in scene.input.parent.iterdir()) == [scene.input.name]
    if not input_changed:
        assert scene.input.read_bytes() == scene.original, "the input was modified"


def assert_refused(result: Result, scene: Scene, message: str, *, terminal: bool = False) -> None:
    assert result.exit_code == 1, (result.output, result.exception)
    assert isinstance(result.exception, SystemExit), result.exception  # no traceback
    assert_one_error(result.stderr, message, terminal=terminal)
    assert result.stdout == ""
    assert_nothing_written(scene)


def assert_converted(result: Result, output: Path) -> None:
    assert result.exit_code == 0, (result.output, result.exception)
    reference = ckpt.load_checkpoint(output).obj
    assert "3.parametrizations.weight.original" in reference


def cli_subprocess(*args: object, cwd: Path, arch_dir: Path, script: str | None = None) -> subprocess.CompletedProcess:
    """``python -m wsconvert ARGS`` (or ``python -c SCRIPT ARGS``, which patches and then runs the same module)."""
    path = os.pathsep.join(filter(None, [str(arch_dir), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "wsconvert"] if script is None else [sys.executable, "-c", script]
    return subprocess.run(
        [*command, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S
    )


# --- point 10: the input must be a regular file -----------------------------------------------------------


def _mknod(path: Path, kind: int, device: tuple[int, int]) -> Path:
    try:
        os.mknod(path, kind | 0o600, os.makedev(*device))
    except (PermissionError, AttributeError) as error:
        pytest.skip(f"creating a device node needs CAP_MKNOD (root): {error}")
    return path


def _fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def _socket(path: Path) -> Path:
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.close()  # the socket file stays
    return path


def _symlink(path: Path, target: str | Path) -> Path:
    path.symlink_to(target)
    return path


SPECIAL_FILES: dict[str, tuple[Callable[[Path], Path], str]] = {
    "fifo": (lambda d: _fifo(d / "pipe.pt"), "is a FIFO (named pipe)"),
    "socket": (lambda d: _socket(d / "s.pt"), "is a socket"),
    "char device": (lambda d: _mknod(d / "null.pt", stat.S_IFCHR, (1, 3)), "is a character device"),
    "block device": (lambda d: _mknod(d / "loop.pt", stat.S_IFBLK, (7, 0)), "is a block device"),
    "symlink to a char device": (lambda d: _symlink(d / "null.pt", "/dev/null"), "is a character device"),
    "symlink to a fifo": (lambda d: _symlink(d / "l.pt", _fifo(d / "pipe")), "is a FIFO"),
    "directory": (lambda d: _mkdir(d / "dir.pt"), "is a directory"),
    "symlink loop": (lambda d: _symlink(d / "a.pt", _symlink(d / "b.pt", d / "a.pt")), "is a symlink loop"),
    "dangling symlink": (lambda d: _symlink(d / "gone.pt", d / "nowhere.pt"), "is a dangling symlink (to "),
}


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


@pytest.mark.parametrize("case", list(SPECIAL_FILES))
def test_input_that_is_not_a_regular_file_is_refused_before_opening(tmp_path: Path, case: str) -> None:
    scene = make_scene(tmp_path)
    make, message = SPECIAL_FILES[case]
    special = make(tmp_path / "in")
    scene.original = scene.input.read_bytes()
    result = run(special, *ARCH, "-o", scene.output)
    assert result.exit_code == 1, (result.output, result.exception)
    assert_one_error(result.stderr, message)
    assert str(special) in result.stderr
    assert sorted(p.name for p in scene.out.iterdir()) == []


def test_unreadable_input_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    scene = make_scene(tmp_path)
    scene.input.chmod(0)
    if os.access(scene.input, os.R_OK):  # root reads anything: make the open fail as it would for a user
        real_open = os.open

        def denied(path: object, *args: object, **kwargs: object) -> int:
            if Path(os.fsdecode(path)) == scene.input:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
            return real_open(path, *args, **kwargs)

        monkeypatch.setattr(os, "open", denied)
        monkeypatch.setattr("builtins.open", _denying_open(scene.input))
    result = run(scene.input, *ARCH, "-o", scene.output)
    scene.input.chmod(0o644)
    assert_refused(result, scene, f"cannot read {scene.input}: Permission denied")


def _denying_open(denied: Path) -> Callable[..., object]:
    import builtins

    real = builtins.open

    def fake(file: object, *args: object, **kwargs: object) -> object:
        if isinstance(file, (str, Path)) and Path(file) == denied:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(file))
        return real(file, *args, **kwargs)

    return fake


def test_fifo_input_does_not_hang_the_command(tmp_path: Path, arch_dir: Path) -> None:
    """A real ``python -m wsconvert`` on a FIFO with no writer: before the fix it blocked in open() forever."""
    fifo = _fifo(tmp_path / "pipe.pt")
    done = cli_subprocess(fifo.name, *ARCH, cwd=tmp_path, arch_dir=arch_dir)
    assert done.returncode == 1, done.stderr
    assert_one_error(done.stderr, "pipe.pt is a FIFO (named pipe), not a regular file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe.pt"]


# --- point 17 and 12: the output ---------------------------------------------------------------------------


OUTPUT_TARGETS: dict[str, tuple[Callable[[Scene], Path], str]] = {
    "char device": (lambda s: _char_device(s.out / "dev.pt"), "is a character device"),
    "symlink to a char device": (lambda s: _symlink(s.out / "null.pt", "/dev/null"), "is a character device"),
    "fifo": (lambda s: _fifo(s.out / "pipe.pt"), "is a FIFO (named pipe)"),
    "socket": (lambda s: _socket(s.out / "s.pt"), "is a socket"),
    "directory": (lambda s: _mkdir(s.out / "dir.pt"), "is a directory"),
    "the input": (lambda s: s.input, "is the input file"),
    "a symlink to the input": (lambda s: _symlink(s.out / "link.pt", s.input), "is the input file"),
    "a hard link to the input": (lambda s: _hardlink(s.out / "hard.pt", s.input), "is the input file"),
    "the input through '..'": (lambda s: s.out / ".." / "in" / s.input.name, "is the input file"),
    "a file as directory": (lambda s: _file(s.out / "f") / "out.pt", "is a file, not a directory"),
    "a name over NAME_MAX": (lambda s: s.out / ("x" * 253 + ".pt"), "longer than the 255"),
}


def _char_device(path: Path) -> Path:
    try:
        return _mknod(path, stat.S_IFCHR, (1, 3))
    except pytest.skip.Exception:
        return _symlink(path, "/dev/null")


def _hardlink(path: Path, target: Path) -> Path:
    os.link(target, path)
    return path


def _file(path: Path) -> Path:
    path.write_bytes(b"not a directory")
    return path


@pytest.mark.parametrize("case", list(OUTPUT_TARGETS))
def test_output_that_is_not_a_regular_file_is_refused_even_with_force(tmp_path: Path, case: str) -> None:
    scene = make_scene(tmp_path)
    make, message = OUTPUT_TARGETS[case]
    target = make(scene)
    before = {p.name: p.lstat() for p in scene.out.iterdir()}
    result = run(scene.input, *ARCH, "-o", target, "--force")
    assert result.exit_code == 1, (result.output, result.exception)
    assert_one_error(result.stderr, message)
    after = {p.name: p.lstat() for p in scene.out.iterdir()}
    assert sorted(after) == sorted(before), "an output or temporary file was left"
    for name, status in before.items():  # the special file is still what it was (a device stays a device)
        assert (after[name].st_mode, after[name].st_ino) == (status.st_mode, status.st_ino), name
    assert scene.input.read_bytes() == scene.original


@pytest.mark.parametrize("length", [250, 255])
def test_output_name_up_to_name_max_is_written(tmp_path: Path, length: int) -> None:
    """The temporary name must fit NAME_MAX too: `.<name>.<random>.tmp` was 22 bytes longer than the name."""
    scene = make_scene(tmp_path)
    output = scene.out / ("m" * (length - 3) + ".pt")
    assert_converted(run(scene.input, *ARCH, "-o", output), output)
    assert sorted(p.name for p in scene.out.iterdir()) == [output.name]


# --- point 11: faults while writing -------------------------------------------------------------------------


class FaultyFile:
    """A binary file whose ``write`` runs ``fault`` on its ``at``-th call (before or instead of writing)."""

    def __init__(self, file: object, fault: Callable[[], None], at: int) -> None:
        self._file, self._fault, self._at, self._calls = file, fault, at, 0

    def write(self, data: object) -> int:
        self._calls += 1
        if self._calls == self._at:
            self._fault()
        return self._file.write(data)

    def __enter__(self) -> FaultyFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self._file.close()

    def __getattr__(self, name: str) -> object:
        return getattr(self._file, name)


def inject_write_fault(monkeypatch: pytest.MonkeyPatch, fault: Callable[[], None], at: int = 3) -> None:
    """Make the output file's writes fail: torch formats through ``open(tmp, "wb")`` in wsconvert.checkpoint.reader,
    safetensors (written by Rust, no Python file) by replacing ``save_file`` with one that writes a part, then
    runs ``fault``."""
    import builtins

    real_open = builtins.open

    def faulty_open(file: object, mode: str = "r", *args: object, **kwargs: object) -> object:
        opened = real_open(file, mode, *args, **kwargs)
        return FaultyFile(opened, fault, at) if "w" in mode else opened

    monkeypatch.setattr(ckpt, "open", faulty_open, raising=False)
    real_save_file = safetensors.torch.save_file

    def faulty_save_file(tensors: dict, filename: str, metadata: dict | None = None) -> None:
        Path(filename).write_bytes(b"partial")
        fault()
        real_save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", faulty_save_file)


def enospc(fmt: str) -> Callable[[], None]:
    def fault() -> None:
        if fmt == "safetensors":  # what safetensors raises on a full disk (seen on a 1 MiB tmpfs)
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    return fault


def interrupt() -> None:
    raise KeyboardInterrupt


FORMATS = ["zip", "legacy", "safetensors"]
TERMINAL = [pytest.param(False, id="pipe"), pytest.param(True, id="terminal")]


@pytest.mark.parametrize("terminal", TERMINAL)
@pytest.mark.parametrize("fmt", FORMATS)
def test_full_disk_while_writing_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str, terminal: bool
) -> None:
    scene = make_scene(tmp_path, fmt)
    monkeypatch.setattr("wsconvert.cli._stderr_is_terminal", lambda: terminal)
    inject_write_fault(monkeypatch, enospc(fmt))
    result = run(scene.input, *ARCH, "-o", scene.output)
    assert_refused(result, scene, f"cannot write {scene.output}: No space left on device", terminal=terminal)


@pytest.mark.parametrize("terminal", TERMINAL)
@pytest.mark.parametrize("fmt", FORMATS)
def test_ctrl_c_while_writing_is_aborted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str, terminal: bool
) -> None:
    """Inside torch's zip writer a KeyboardInterrupt surfaces as a RuntimeError: it must still be ``Aborted!``."""
    scene = make_scene(tmp_path, fmt)
    monkeypatch.setattr("wsconvert.cli._stderr_is_terminal", lambda: terminal)
    inject_write_fault(monkeypatch, interrupt)
    result = run(scene.input, *ARCH, "-o", scene.output)
    assert result.exit_code == 1, (result.output, result.exception)
    assert_aborted(result.stderr, terminal=terminal)
    assert_nothing_written(scene)


def test_ctrl_c_wrapped_by_the_loader_is_aborted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Anywhere in the command: a library error caused by Ctrl-C is ``Aborted!``, not a 'corrupt file' error."""
    scene = make_scene(tmp_path)

    def interrupted_load(*args: object, **kwargs: object) -> None:
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as error:
            raise RuntimeError("PytorchStreamReader failed reading file data.pkl") from error

    monkeypatch.setattr(torch, "load", interrupted_load)
    result = run(scene.input, *ARCH, "-o", scene.output)
    assert result.exit_code == 1, (result.output, result.exception)
    assert_aborted(result.stderr)
    assert_nothing_written(scene)


def test_input_truncated_while_writing_from_memory_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A legacy input is read into memory: the write succeeds, but the input changed, so nothing is kept."""
    scene = make_scene(tmp_path, "legacy")
    inject_write_fault(monkeypatch, lambda: os.truncate(scene.input, 100))
    result = run(scene.input, *ARCH, "-o", scene.output)
    assert result.exit_code == 1, (result.output, result.exception)
    assert_one_error(result.stderr, f"input {scene.input} changed while converting (truncated to 100 bytes")
    assert_nothing_written(scene, input_changed=True)
    assert scene.input.stat().st_size == 100


# Run as ``python -c``: patch the output's writes, then run ``python -m wsconvert`` itself.
SUBPROCESS_PATCH = """
import os, runpy, signal, sys
import safetensors.torch, torch
from wsconvert.checkpoint import reader as ckpt
fault, source = sys.argv[1], sys.argv[2]

def act():
    if fault == "sigint":
        os.kill(os.getpid(), signal.SIGINT)  # a real signal, delivered inside torch's zip writer
    else:
        os.truncate(source, 64)  # as another process would: the mapped tensors are gone

real_save, real_save_file = torch.serialization.save, safetensors.torch.save_file

class Writes:
    def __init__(self, f): self.f, self.n = f, 0
    def write(self, data):
        self.n += 1
        if self.n == 3: act()
        return self.f.write(data)
    def __getattr__(self, name): return getattr(self.f, name)

torch.serialization.save = lambda obj, f, *a, **k: real_save(obj, Writes(f), *a, **k)  # what wsconvert calls
def save_file(tensors, filename, metadata=None):
    act()
    real_save_file(tensors, filename, metadata=metadata)
safetensors.torch.save_file = save_file
sys.argv = ["wsconvert", *sys.argv[2:]]
runpy.run_module("wsconvert", run_name="__main__", alter_sys=True)
"""


@pytest.mark.parametrize(
    ("fmt", "fault"),
    [("zip", "sigint"), ("zip", "truncate"), ("safetensors", "truncate")],
    ids=["sigint-zip", "truncated-zip", "truncated-safetensors"],
)
def test_real_signals_while_writing(tmp_path: Path, arch_dir: Path, fmt: str, fault: str) -> None:
    """A real SIGINT inside torch's writer is ``Aborted!``; a memory-mapped input truncated by another process
    raises SIGBUS while its tensors are written, which used to kill the process (exit -7): one line now."""
    scene = make_scene(tmp_path, fmt)
    done = cli_subprocess(fault, scene.input, *ARCH, "-o", scene.output, cwd=tmp_path, arch_dir=arch_dir,
                          script=SUBPROCESS_PATCH)  # fmt: skip
    assert done.returncode == 1, (done.returncode, done.stderr)
    if fault == "sigint":
        assert_aborted(done.stderr)
    else:
        assert_one_error(done.stderr, f"input {scene.input} changed while converting (truncated")
    assert done.stdout == ""
    assert_nothing_written(scene, input_changed=fault == "truncate")


@pytest.fixture
def small_filesystem(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs (root only): a real ENOSPC. Skipped, saying why, where mounting is not permitted."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount_point)],
                                 capture_output=True, text=True, timeout=30)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as error:
        pytest.skip(f"cannot run mount for a small tmpfs: {error}")
    if mounted.returncode != 0:
        pytest.skip(f"mounting a small tmpfs is not permitted here: {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], capture_output=True, timeout=30)


@pytest.mark.parametrize("fmt", FORMATS)
def test_real_full_disk(tmp_path: Path, small_filesystem: Path, fmt: str) -> None:
    scene = make_scene(tmp_path, fmt)
    output = small_filesystem / f"model.ws{scene.input.suffix}"
    result = run(scene.input, *ARCH, "-o", output)
    assert result.exit_code == 1, (result.output, result.exception)
    assert_one_error(result.stderr, f"cannot write {output}: No space left on device")
    assert sorted(p.name for p in small_filesystem.iterdir()) == []
    assert scene.input.read_bytes() == scene.original


# --- point 13: --arch specs ---------------------------------------------------------------------------------


ARCH_SPECS = {
    "relative module": (".relative:build", "is a relative module name"),
    "relative submodule": ("..pkg.mod:build", "give the absolute module path"),
    "module raises on import": (
        "wsc_adversarial_raises:build",
        "importing 'wsc_adversarial_raises' failed (RuntimeError: broken at import)",
    ),
    "module exits on import": (
        "wsc_adversarial_exits:build",
        "importing 'wsc_adversarial_exits' failed (SystemExit: 3)",
    ),
    "module __getattr__ raises": ("wsc_adversarial_getattr:build", "failed (LookupError: no build in here)"),
    "not callable": ("wsc_adversarial_net:not_callable", "not_callable is an int, not a callable"),
    "no attribute": ("wsc_adversarial_net:missing", "has no attribute 'missing'"),
    "empty attribute": ("wsc_adversarial_net:", "is not a spec"),
    "empty module": (":build", "is not a spec"),
    "file path": ("models/net.py:build", "is a file path; give the module's dotted name"),
    "missing module": ("wsc_no_such_module:build", "cannot import 'wsc_no_such_module'"),
}


@pytest.mark.parametrize("case", list(ARCH_SPECS))
def test_bad_arch_spec_is_one_line(tmp_path: Path, case: str) -> None:
    scene = make_scene(tmp_path)
    spec, message = ARCH_SPECS[case]
    assert_refused(run(scene.input, "--arch", spec, "-o", scene.output), scene, message)


def test_good_arch_spec_still_converts(tmp_path: Path) -> None:
    scene = make_scene(tmp_path)
    assert_converted(run(scene.input, *ARCH, "-o", scene.output), scene.output)
