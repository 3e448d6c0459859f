"""Image datasets in their published formats, read without running code from them.

CIFAR-10, python version (https://www.cs.toronto.edu/~kriz/cifar.html): the archive
``cifar-10-python.tar.gz`` as downloaded (read in place), or the folder ``cifar-10-batches-py``
it unpacks to (or a folder holding that one).  Its six files ``data_batch_1`` .. ``data_batch_5``
(the 50,000 training images, in this order) and ``test_batch`` (10,000) are pickled dicts:
``b"data"`` uint8 (n, 3072), each row the red, green and blue 32 x 32 planes of one image, row
major; ``b"labels"`` n integers 0..9.

A pickle runs whatever its author put in it when it is loaded with :mod:`pickle`: every
global it names is looked up and called, and even NumPy's own array and dtype constructors,
given crafted arguments and states, read memory they should not.  Nor is refusing globals
enough: the C unpickler grows its memo to twice any index a file names, hashing a dict key
recurses without limit, one byte builds an object, and a few opcodes copy the same megabytes
again and again.  These files are read by :class:`_ArraysOnly`, the pure-Python unpickler
limited to the opcodes a dict of arrays, lists, strings and numbers needs (:data:`_OPCODES`,
at most :data:`MAX_OPS`; dict keys bytes or text; the bytes it makes at most twice the file's),
whose globals are stand-ins that call nothing: a pickled array becomes a record of its dtype
code (one of ``[biuf][1248]``), shape (at most 8 dimensions of at most 2^31) and bytes, and
only then an array, by ``np.frombuffer``, when the bytes are exactly what the shape needs.
Anything else is refused, naming it, and never repr'd whole.  A batch file is read up to
:data:`MAX_BATCH_BYTES`.  An archive (gzip or plain tar, at most :data:`MAX_COMPRESSED_BYTES`)
is read by a strict reader of its ustar headers (Python's tarfile parses pax headers, sparse
maps and long names in ways a few hundred crafted bytes make take hours or gigabytes): regular
files and folders only, each header's checksum verified, at most :data:`MAX_MEMBERS` members
and :data:`MAX_ARCHIVE_BYTES` decompressed, read to its end, so that gzip verifies its
checksum; its gzip is decoded by zlib itself (:class:`_Gunzip`).
"""
from __future__ import annotations

import io
import math
import pickle
import pickletools
import re
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CIFAR10_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_ACCEPTED = (f"CIFAR-10's python version: the archive cifar-10-python.tar.gz as "
                    f"downloaded, or the folder {CIFAR10_FOLDER} it unpacks to (data_batch_1 .. "
                    "data_batch_5 and test_batch)")
TAR_SUFFIXES = (".tar.gz", ".tgz", ".tar")

#: A CIFAR-10 batch file is 31 MB; anything far larger is not one (and is not read).
MAX_BATCH_BYTES = 64 << 20
#: The dtypes an array in a data file may have (numeric; no objects, no structures).
_DTYPE_KINDS = "biuf"


#: At most this many pickle opcodes per file (a CIFAR-10 batch has 30,000 to 120,000): each
#: builds at most one small object, so a file's objects stay within a small multiple of it.
MAX_OPS = 1_000_000
#: Dtype codes a pickled array may have: numbers of 1 to 8 bytes (np.dtype never sees another
#: string: its parser turns some into huge structures before a kind could be checked).
_DTYPE_CODE = re.compile(r"[biuf][1248]")
_MAX_DIMS, _MAX_DIM = 8, 1 << 31


class _Refused(pickle.UnpicklingError):
    pass


def _brief(v) -> str:
    """A value of the file in a message: short text as it is, anything else by its type (a
    repr of the file's own objects can be made to take gigabytes)."""
    if isinstance(v, (str, bytes)) and len(v) <= 40:
        return repr(v)
    if type(v) is int and v.bit_length() <= 64:
        return str(v)
    name = type(v).__name__
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def _clipped(e: BaseException, limit: int = 200) -> str:
    """An exception's text for a message, clipped (float() puts a whole line of the file in its
    own)."""
    text = str(e)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


def _name_of(v) -> str:
    """A module or global name of the file, as it is when it looks like one."""
    return v if isinstance(v, str) and len(v) <= 60 and v.isprintable() else _brief(v)


class _StandIn:
    """A stand-in for a global of a pickled array: called by REDUCE, it records its arguments
    and returns a record; it takes no state and no attributes.  ``owner``: the unpickler whose
    budget of bytes it charges what it makes."""
    __slots__ = ("name", "owner")

    def __init__(self, name, owner=None):
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "owner", owner)

    def __setattr__(self, key, value):
        raise _Refused(f"it sets an attribute of {self.name}")


class _Dtype(_StandIn):
    """``numpy.dtype(code, align, copy)``, then BUILD with (version, byte order, ...)."""

    def __call__(self, code, align=False, copy=True):
        return _DtypeRecord(code)


class _DtypeRecord:
    __slots__ = ("code", "order")

    def __init__(self, code):
        if isinstance(code, bytes):
            code = code.decode("ascii", "replace")
        if not (isinstance(code, str) and _DTYPE_CODE.fullmatch(code)):
            raise _Refused(f"an array of dtype {_brief(code)} (only numbers are read)")
        self.code, self.order = code, "="

    def build(self, state):
        order = state[1] if isinstance(state, tuple) and len(state) > 1 else None
        if isinstance(order, bytes):
            order = order.decode("ascii", "replace")
        if order not in ("<", ">", "|", "="):
            raise _Refused(f"a dtype state of {_brief(state)}")
        self.order = order

    def dtype(self) -> np.dtype:
        dt = np.dtype(self.code)
        return dt.newbyteorder(self.order) if self.order in "<>" else dt


class _Ndarray(_StandIn):
    """``numpy.ndarray``: only as the first argument of ``_reconstruct``, never called."""

    def __call__(self, *args):
        raise _Refused("it calls numpy.ndarray directly")


class _ArrayRecord:
    """A pickled array: dtype, shape and bytes, made into an array by :meth:`array` only when
    the bytes are exactly what the shape and dtype need."""
    __slots__ = ("shape", "dtype", "fortran", "raw")

    def __init__(self):
        self.shape = None

    def build(self, state):
        if not (isinstance(state, tuple) and len(state) == 5):
            raise _Refused(f"an array state of {_brief(state)}")
        _, shape, dtype, fortran, raw = state
        self.set(shape, dtype, raw, fortran is True)

    def set(self, shape, dtype, raw, fortran=False):
        if self.shape is not None:
            raise _Refused("an array given a state twice")
        if not (isinstance(shape, tuple) and len(shape) <= _MAX_DIMS
                and all(type(v) is int and 0 <= v <= _MAX_DIM for v in shape)):
            raise _Refused(f"an array of shape {_brief(shape)}" + (
                f" {shape}" if isinstance(shape, tuple) and len(shape) <= _MAX_DIMS
                and all(type(v) is int and v.bit_length() <= 64 for v in shape) else ""))
        if not isinstance(dtype, _DtypeRecord):
            raise _Refused(f"an array of dtype {_brief(dtype)}")
        if not isinstance(raw, (bytes, bytearray)):       # np.frombuffer takes both, uncopied
            raise _Refused(f"an array whose data is {_brief(raw)}, not bytes (objects?)")
        self.shape, self.dtype, self.fortran, self.raw = shape, dtype, fortran, raw

    def array(self) -> np.ndarray:
        if self.shape is None:
            raise _Refused("an array without data")
        dt = self.dtype.dtype()
        n = math.prod(self.shape)           # at most 8 factors of at most 2^31
        if n * dt.itemsize != len(self.raw):
            raise _Refused(f"an array of shape {self.shape} and dtype {dt} from {len(self.raw)} "
                           f"bytes ({n * dt.itemsize} needed)")
        a = np.frombuffer(self.raw, dtype=dt).reshape(self.shape, order="F" if self.fortran else "C")
        return a.copy(order="K")            # writable, as pickle gives it


class _Reconstruct(_StandIn):
    """``_reconstruct(ndarray, (0,), b"b")``, then BUILD with (version, shape, dtype, fortran,
    bytes)."""

    def __call__(self, cls, shape=None, code=None):
        if not isinstance(cls, _Ndarray):
            raise _Refused(f"_reconstruct of {_brief(cls)}")
        return _ArrayRecord()


class _Frombuffer(_StandIn):
    """``_frombuffer(buffer, dtype, shape, order)`` (protocol 5)."""

    def __call__(self, buf, dtype, shape, order="C"):
        rec = _ArrayRecord()
        rec.set(shape, dtype, buf, order == "F")
        return rec


class _Encode(_StandIn):
    """``_codecs.encode(text, "latin1")``: how Python 3 writes bytes under protocols 0 to 2."""

    def __call__(self, text, encoding="utf-8"):
        if not isinstance(text, str) or encoding not in ("latin1", "latin-1", "iso-8859-1"):
            raise _Refused(f"_codecs.encode of {_brief(text)} in {_brief(encoding)}")
        self.owner.charge(len(text))
        return text.encode("latin1")


#: The globals a pickled NumPy array names (under NumPy 1 and 2, every protocol), each mapped to
#: its stand-in; a CIFAR-10 batch names nothing else.
_STAND_INS = {
    ("numpy.core.multiarray", "_reconstruct"): _Reconstruct("numpy _reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"): _Reconstruct("numpy _reconstruct"),
    ("numpy.core.numeric", "_frombuffer"): _Frombuffer("numpy _frombuffer"),
    ("numpy._core.numeric", "_frombuffer"): _Frombuffer("numpy _frombuffer"),
    ("numpy", "ndarray"): _Ndarray("numpy.ndarray"),
    ("numpy", "dtype"): _Dtype("numpy.dtype"),
    ("_codecs", "encode"): _Encode("_codecs.encode"),
}

#: The opcodes a pickled dict of arrays, lists, strings and numbers is made of (protocols 0 to
#: 5): no sets, no instances (INST, OBJ, NEWOBJ), no extension codes, persistent ids, out-of-band
#: buffers or DUP.
_OPCODES = (
    "PROTO FRAME STOP MARK POP POP_MARK NONE NEWTRUE NEWFALSE INT BININT BININT1 BININT2 LONG "
    "LONG1 FLOAT BINFLOAT STRING BINSTRING SHORT_BINSTRING BINBYTES SHORT_BINBYTES BINBYTES8 "
    "BYTEARRAY8 UNICODE BINUNICODE SHORT_BINUNICODE BINUNICODE8 EMPTY_LIST LIST APPEND APPENDS "
    "EMPTY_TUPLE TUPLE TUPLE1 TUPLE2 TUPLE3 EMPTY_DICT DICT SETITEM SETITEMS GET BINGET "
    "LONG_BINGET PUT BINPUT LONG_BINPUT MEMOIZE GLOBAL STACK_GLOBAL REDUCE BUILD").split()
_KEY_TYPES = (bytes, str)               # dict keys: their hash is computed once, without recursion


class _ArraysOnly(pickle._Unpickler):
    """NumPy arrays, dicts, lists, tuples, strings, bytes and numbers from a pickle, calling
    nothing: the pure-Python unpickler (``pickle._Unpickler``, which the C one mirrors: its
    memo is a dict, and every opcode is a method, so each can be refused or checked here)
    with only :data:`_OPCODES`, at most :data:`MAX_OPS` of them, whose globals are the
    stand-ins :data:`_STAND_INS` (one set per unpickler, which charge its budget of bytes)
    and whose dict keys are bytes or text."""

    dispatch = {}

    def __init__(self, file, budget: int):
        super().__init__(file, encoding="bytes")
        self.ops, self.budget = 0, budget
        self.stand_ins = {k: type(v)(v.name, self) for k, v in _STAND_INS.items()}

    def charge(self, n: int) -> None:
        """Bytes made from the file's (by ``_codecs.encode``, and arrays copied from their
        bytes): at most ``budget`` in all, however often the file refers to the same data."""
        self.budget -= n
        if self.budget < 0:
            raise _Refused("more data than the file holds (one string or array used many times)")

    def find_class(self, module, name):
        try:
            return self.stand_ins[(module, name)]
        except (KeyError, TypeError):
            raise _Refused(f"it asks for {_name_of(module)}.{_name_of(name)}, which a data "
                           "file never needs (only arrays, lists and numbers are read)") from None

    def load_reduce(self):
        args = self.stack.pop()
        func = self.stack[-1]
        if not (isinstance(func, _StandIn) and type(args) is tuple):
            raise _Refused(f"it calls {_brief(func)}")
        self.stack[-1] = func(*args)

    def load_build(self):
        state = self.stack.pop()
        inst = self.stack[-1]
        if not isinstance(inst, (_ArrayRecord, _DtypeRecord)):
            raise _Refused(f"it gives {getattr(inst, 'name', _brief(inst))} a state")
        inst.build(state)

    def load_setitem(self):
        value = self.stack.pop()
        key = self.stack.pop()
        self._set(self.stack[-1], [key, value])

    def load_setitems(self):
        items = self.pop_mark()
        self._set(self.stack[-1], items)

    def load_dict(self):
        items = self.pop_mark()
        d = {}
        self._set(d, items)
        self.append(d)

    def load_bytearray8(self):
        size = int.from_bytes(self.read(8), "little")
        if size > MAX_BATCH_BYTES:          # bytearray(size) would be allocated before reading
            raise _Refused(f"a bytearray of {size} bytes")
        b = bytearray(size)
        if self.readinto(b) != size:
            raise _Refused("a bytearray longer than the file")
        self.append(b)

    @staticmethod
    def _set(d, items):
        if type(d) is not dict:
            raise _Refused(f"it sets items of {_brief(d)}")
        for i in range(0, len(items), 2):
            if type(items[i]) not in _KEY_TYPES:
                raise _Refused(f"a dict key of {_brief(items[i])}")
            d[items[i]] = items[i + 1]


def _counted(method):
    def op(self):
        self.ops += 1
        if self.ops > MAX_OPS:
            raise _Refused(f"more than {MAX_OPS} pickle opcodes (a CIFAR-10 batch has ~120,000 "
                           "at most)")
        method(self)
    return op


def _refused_opcode(what: str):
    def op(self):
        raise _Refused(f"it holds {what}")
    return op


_NAMES = {op.code.encode("latin1")[0]: op.name for op in pickletools.opcodes}
for _code in range(256):
    _ArraysOnly.dispatch[_code] = _refused_opcode(
        f"the pickle opcode {_NAMES[_code]}, which a data file never needs" if _code in _NAMES
        else f"the byte {_code:#04x} where a pickle opcode belongs (not a pickle?)")
for _name in _OPCODES:
    _code = getattr(pickle, _name)[0]
    _ArraysOnly.dispatch[_code] = _counted(getattr(_ArraysOnly, pickle._Unpickler.dispatch[_code].__name__))


def _loads(raw: bytes):
    """The object pickled in ``raw``, its top-level arrays (a dict's values, or the object
    itself) made into NumPy arrays; a record nested deeper stays a record (and fails the
    checks of its reader).  An opcode outside :data:`_OPCODES` is refused by its name."""
    unpickler = _ArraysOnly(io.BytesIO(raw), budget=2 * len(raw) + (1 << 20))
    obj = unpickler.load()

    def array(record):
        unpickler.charge(len(record.raw) if record.shape is not None else 0)
        return record.array()
    if isinstance(obj, _ArrayRecord):
        return array(obj)
    if isinstance(obj, dict):
        return {k: array(v) if isinstance(v, _ArrayRecord) else v for k, v in obj.items()}
    return obj


@dataclass(frozen=True)
class LabelledImages:
    """A training and a test set: images uint8 (N, C, H, W), labels int64 (N,); ``source``: the
    path read."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    source: str


def is_cifar10(path) -> bool:
    """Whether ``path`` is meant as CIFAR-10's python version: a folder, or a file named as a
    tar archive (``.tar.gz``, ``.tgz``, ``.tar``) whose content is not a NumPy file (an ``.npz``
    so named is read as one).  Whether it holds the batches is :func:`load_cifar10`'s to say."""
    p = Path(path)
    if p.is_dir():
        return True
    if not (p.is_file() and p.name.endswith(TAR_SUFFIXES)):
        return False
    try:
        with open(p, "rb") as f:
            head = f.read(6)
    except OSError:
        return True             # load_cifar10 says why it cannot be read
    return not (head.startswith(b"\x93NUMPY") or head.startswith(b"PK"))


def load_cifar10(path) -> LabelledImages:
    """CIFAR-10 from its python version at ``path`` (the module docstring): 50,000 training and
    10,000 test images, uint8 NCHW, and their labels.  Raises ValueError naming what is missing
    or malformed (and what is accepted); OSError where a file cannot be read."""
    p = Path(path)
    if not p.exists():
        raise ValueError(f"{str(p)!r} does not exist; accepted: {CIFAR10_ACCEPTED}")
    if p.is_dir():
        if not (p / "test_batch").exists() and (p / CIFAR10_FOLDER).is_dir():
            p = p / CIFAR10_FOLDER
        missing = [n for n in CIFAR10_BATCHES if not (p / n).is_file()]
        if missing:
            raise ValueError(f"{str(p)!r} lacks the CIFAR-10 file(s) {', '.join(missing)}; "
                             f"accepted: {CIFAR10_ACCEPTED}")
        raw = {}
        for name in CIFAR10_BATCHES:
            with open(p / name, "rb") as f:
                raw[name] = f.read(MAX_BATCH_BYTES + 1)
            _check_size(len(raw[name]), name, str(p))
        return _batches(raw, str(p))
    if not p.name.endswith(TAR_SUFFIXES):
        raise ValueError(f"{str(p)!r} is neither a folder nor a .tar.gz archive; accepted: "
                         f"{CIFAR10_ACCEPTED}")
    try:
        raw = _read_archive(p)
    except (EOFError, zlib.error) as e:   # truncated, bad CRC
        raise ValueError(f"{str(p)!r} cannot be read as a tar archive ({type(e).__name__}: "
                         f"{_clipped(e)}); accepted: {CIFAR10_ACCEPTED}") from None
    return _batches(raw, str(p))


#: What an archive may decompress to: the six batches and CIFAR-10's few small other files; and
#: what it may be on disk (the download is 163 MB).
MAX_ARCHIVE_BYTES = 6 * MAX_BATCH_BYTES + (16 << 20)
MAX_COMPRESSED_BYTES = 256 << 20
MAX_MEMBERS = 1000
#: Metadata members (pax headers, GNU long names) are skipped, up to this size each.
_MAX_META_BYTES = 64 << 10
_REGULAR, _DIRECTORY, _META = (b"0", b"\0", b"7"), (b"5",), (b"x", b"g", b"L", b"K")


#: Gzip members an archive may be made of (gzip allows concatenated members; the download is one,
#: and a block-gzipped copy of it, 64 KiB a member, some 3,000).
MAX_GZIP_MEMBERS = 10_000
#: Compressed bytes an archive may hold beyond twice what they decompress to.  Real gzip makes
#: more than it reads (CIFAR-10's download about 1.2 bytes a byte; incompressible data in
#: stored blocks all but 5 bytes in 64 KiB); what makes nothing (header fields, trailers,
#: empty members) is a few KiB.  Empty deflate blocks make nothing, and zlib steps through an
#: archive of them slowly, also with a byte of output now and then.
_MAX_EXCESS_INPUT = 4 << 20


class _Gunzip:
    """The decompressed bytes of a gzip file, decoded by zlib itself: its headers, CRCs and
    lengths are checked in C, members concatenated as gzip allows (at most
    :data:`MAX_GZIP_MEMBERS`) and zero padding between or after them skipped a chunk at a time.
    Python's gzip steps through padding and header names one byte at a time (about 0.15 s per
    MB; 40 s within :data:`MAX_COMPRESSED_BYTES`).  Output comes 1 MiB at a time, however
    little input makes it, and compressed input of more than :data:`_MAX_EXCESS_INPUT` bytes
    beyond twice the output so far is refused (a stream that makes next to nothing).  Raises
    EOFError where the file ends inside a member, zlib.error where its data or a checksum is
    wrong."""

    _CHUNK, _OUT = 1 << 16, 1 << 20

    def __init__(self, f, src: str):
        self.f, self.src = f, src
        self.z, self.members, self.input = zlib.decompressobj(wbits=31), 1, b""
        self.out, self.ended = bytearray(), False
        self.read_total = self.made_total = 0      # compressed bytes read, decompressed made

    def _next_member(self) -> None:
        """After a member: skip zero padding; the end of the file, or the next member."""
        rest = self.z.unused_data.lstrip(b"\0")
        while not rest:
            chunk = self.f.read(self._CHUNK)
            if not chunk:
                self.ended = True
                return
            rest = chunk.lstrip(b"\0")
        if self.members == MAX_GZIP_MEMBERS:
            raise ValueError(f"{self.src!r} is made of more than {MAX_GZIP_MEMBERS} gzip members; "
                             "CIFAR-10's python version is one")
        self.z, self.members, self.input = zlib.decompressobj(wbits=31), self.members + 1, rest

    def _fill(self) -> None:
        while not self.ended:
            if self.z.eof:
                self._next_member()
                continue
            data = self.z.unconsumed_tail or self.input
            if not data:
                data = self.f.read(self._CHUNK)
                self.read_total += len(data)
            self.input = b""
            if not data:
                raise EOFError("the gzip stream ends inside a member (truncated?)")
            made = self.z.decompress(data, self._OUT)
            self.made_total += len(made)
            if self.read_total > _MAX_EXCESS_INPUT + 2 * self.made_total:
                raise ValueError(f"{self.src!r}: {self.read_total} bytes of its gzip stream "
                                 f"decompress to {self.made_total} (a crafted archive; real gzip "
                                 f"makes more than it reads); accepted: {CIFAR10_ACCEPTED}")
            if made:
                self.out += made
                return

    def read(self, n: int) -> bytes:
        """``n`` bytes, fewer only at the end of the file."""
        while len(self.out) < n and not self.ended:
            self._fill()
        with memoryview(self.out) as view:       # one copy (a slice, then bytes(), made two)
            taken = view[:n].tobytes()
        del self.out[:n]
        return taken


class _Capped:
    """The decompressed stream of an archive, read exactly: refused past
    :data:`MAX_ARCHIVE_BYTES` (a few MB of gzip can decompress to gigabytes) and where it ends
    before a member does."""

    def __init__(self, f, src: str):
        self.f, self.src, self.total = f, src, 0

    def read(self, n: int, exact: bool = True) -> bytes:
        self.total += n
        if self.total > MAX_ARCHIVE_BYTES:
            raise ValueError(f"{self.src!r} decompresses to more than {MAX_ARCHIVE_BYTES} bytes; "
                             "CIFAR-10's python version, about 190 MB, does not")
        b = self.f.read(n)
        if exact and len(b) != n:
            raise ValueError(f"{self.src!r} ends inside a member (truncated?); accepted: "
                             f"{CIFAR10_ACCEPTED}")
        return b

    def drain(self) -> None:
        """Read to the end (where gzip checks its CRC), within the cap."""
        while self.read(1 << 20, exact=False):
            pass

    def skip(self, n: int) -> None:
        while n > 0:
            k = min(n, 1 << 20)
            self.read(k)
            n -= k


def _octal(field: bytes, what: str, src: str) -> int:
    digits = field.rstrip(b"\0 ").lstrip(b" ")
    if not digits or len(digits) > 12 or any(c not in b"01234567" for c in digits):
        raise ValueError(f"{src!r}: a tar header's {what} is not an octal number (a damaged or "
                         f"unusual archive); accepted: {CIFAR10_ACCEPTED}")
    return int(digits, 8)


def _tar_members(stream: _Capped, src: str):
    """(name, type flag, size) of each member of the tar stream, which the caller reads or
    skips (``size`` bytes, then the padding to 512) before asking for the next.  A strict
    reader of the ustar headers GNU tar writes: each header's checksum verified; regular
    files, directories, and metadata members (pax headers, GNU long names: skipped, at most
    64 KiB) only; links, devices and sparse files refused (Python's tarfile parses these, and
    pax headers, in ways a crafted few hundred bytes make take hours or gigabytes)."""
    for count in range(MAX_MEMBERS + 1):
        header = stream.read(512)
        if header == bytes(512):
            return                       # end of archive (a second zero block may follow)
        if count == MAX_MEMBERS:
            raise ValueError(f"{src!r} holds more than {MAX_MEMBERS} members; CIFAR-10's python "
                             "version holds fewer than 10")
        if header[257:262] not in (b"ustar", bytes(5)):     # ustar, GNU, or old (v7) tar
            raise ValueError(f"{src!r}: a tar header without the ustar mark (a damaged or "
                             f"unusual archive); accepted: {CIFAR10_ACCEPTED}")
        stored = _octal(header[148:156], "checksum", src)
        unsigned = sum(header[:148]) + 8 * 32 + sum(header[156:])
        signed = unsigned - 256 * sum(1 for c in header[:148] + header[156:] if c > 127)
        if stored not in (unsigned, signed):          # some old tars summed signed bytes
            raise ValueError(f"{src!r}: a tar header fails its checksum (a damaged archive); "
                             f"accepted: {CIFAR10_ACCEPTED}")
        size, kind = _octal(header[124:136], "size", src), header[156:157]
        name = header[:100].split(b"\0", 1)[0]
        if header[257:265] == b"ustar\x0000":        # POSIX: a prefix; GNU keeps other fields there
            prefix = header[345:500].split(b"\0", 1)[0]
            name = prefix + b"/" + name if prefix else name
        name = name.decode("utf-8", "surrogateescape")     # distinct bytes, distinct names
        if kind in _META:
            if size > _MAX_META_BYTES:
                raise ValueError(f"{src!r}: a tar metadata member of {size} bytes; accepted: "
                                 f"{CIFAR10_ACCEPTED}")
        elif kind not in _REGULAR + _DIRECTORY:
            raise ValueError(f"{src!r}: {_name_of(name)} is a tar member of type {_brief(kind)} "
                             f"(a link, device or sparse file), which is not read; accepted: "
                             f"{CIFAR10_ACCEPTED}")
        yield name, kind, size


def _read_archive(p: Path) -> dict:
    """The six batch files of the tar archive ``p`` (gzip or plain), read in one pass in the
    archive's order (a gzip stream cannot seek back without decompressing again from its
    start), all from one folder, each once; then the stream to its end, so that gzip verifies
    its checksum.  At most :data:`MAX_MEMBERS` members and :data:`MAX_ARCHIVE_BYTES`."""
    if not p.is_file():
        raise ValueError(f"{str(p)!r} is not a file; accepted: {CIFAR10_ACCEPTED}")
    if p.stat().st_size > MAX_COMPRESSED_BYTES:
        raise ValueError(f"{str(p)!r} is {p.stat().st_size} bytes; CIFAR-10's python version is "
                         f"163 MB (at most {MAX_COMPRESSED_BYTES} are read)")
    with open(p, "rb") as f:
        head = f.read(262)
    gz = head[:2] == b"\x1f\x8b"
    if not (gz or head[257:262] in (b"ustar", bytes(5))):
        raise ValueError(f"{str(p)!r} is neither a gzip nor a tar archive (CIFAR-10's python "
                         f"version is a .tar.gz); accepted: {CIFAR10_ACCEPTED}")
    raw, where = {}, {}
    with open(p, "rb") as f:
        stream = _Capped(_Gunzip(f, str(p)) if gz else f, str(p))
        for path, kind, size in _tar_members(stream, str(p)):
            name = path.rsplit("/", 1)[-1]
            # folders (also an old-style entry whose name ends in "/", as tarfile reads it) and
            # metadata are skipped, whatever their names
            if name in CIFAR10_BATCHES and kind in _REGULAR:
                if name in where:
                    raise ValueError(f"{str(p)!r} holds {name} twice ({_name_of(where[name])} "
                                     f"and {_name_of(path)}); accepted: {CIFAR10_ACCEPTED}")
                _check_size(size, name, str(p))
                where[name] = path
                raw[name] = stream.read(size)
                stream.skip(-size % 512)
            else:
                stream.skip(size + (-size % 512))
        stream.drain()
    missing = [n for n in CIFAR10_BATCHES if n not in raw]
    if missing:
        raise ValueError(f"{str(p)!r} holds no {', '.join(missing)}; accepted: {CIFAR10_ACCEPTED}")
    folders = {v.rsplit("/", 1)[0] if "/" in v else "." for v in where.values()}
    if len(folders) > 1:
        raise ValueError(f"{str(p)!r} holds the batch files in several folders "
                         f"({', '.join(_name_of(d) for d in sorted(folders))}); accepted: "
                         f"{CIFAR10_ACCEPTED}")
    return raw


def _check_size(size: int, name: str, src: str) -> None:
    if size > MAX_BATCH_BYTES:
        raise ValueError(f"{src!r}: {name} is {size} bytes; a CIFAR-10 batch is about 31 MB "
                         f"(at most {MAX_BATCH_BYTES} bytes are read)")


def _batches(raw: dict, src: str) -> LabelledImages:
    parts = [_batch(raw.pop(name), name, src) for name in CIFAR10_BATCHES]
    return LabelledImages(np.concatenate([x for x, _ in parts[:5]]),
                          np.concatenate([y for _, y in parts[:5]]), parts[5][0], parts[5][1], src)


def _batch(raw: bytes, name: str, src: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (n, 3, 32, 32), labels int64 (n,)) of one batch file, checked."""
    what = f"{src!r}: {name} is not a CIFAR-10 python batch"
    try:
        d = _loads(raw)
    except _Refused as e:
        raise ValueError(f"{what}: {e}; accepted: {CIFAR10_ACCEPTED}") from None
    except Exception as e:  # noqa: BLE001 - UnpicklingError, EOFError, ValueError, ...
        raise ValueError(f"{what} ({type(e).__name__}: {_clipped(e)}); accepted: "
                         f"{CIFAR10_ACCEPTED}") from None
    if not isinstance(d, dict) or b"data" not in d or b"labels" not in d:
        raise ValueError(f"{what} (a pickled dict with b'data' and b'labels'); accepted: "
                         f"{CIFAR10_ACCEPTED}")
    data, labels = d[b"data"], d[b"labels"]
    if not isinstance(data, np.ndarray):
        raise ValueError(f"{what}: its b'data' is a {type(data).__name__}, not an array")
    if isinstance(labels, np.ndarray) and labels.ndim == 1 and labels.dtype.kind in "iu":
        labels = labels.astype(np.int64)
    elif isinstance(labels, (list, tuple)) and all(type(v) is int for v in labels):
        if not all(0 <= v <= 9 for v in labels):      # before int64 (2**70 would overflow)
            bad = next(v for v in labels if not 0 <= v <= 9)
            raise ValueError(f"{src!r}: {name} has labels outside 0..9 (e.g. {_brief(bad)})")
        labels = np.array(labels, dtype=np.int64)
    else:
        raise ValueError(f"{what}: its b'labels' must be a list of integers (0..9); got "
                         + (f"a list holding {type(next(v for v in labels if type(v) is not int)).__name__}"
                            if isinstance(labels, (list, tuple)) else f"a {type(labels).__name__}"
                            + (f" of dtype {labels.dtype} and shape {labels.shape}"
                               if isinstance(labels, np.ndarray) else "")))
    if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
        raise ValueError(f"{src!r}: {name} has data of shape {data.shape} and {len(labels)} "
                         "labels; a CIFAR-10 batch has (n, 3072) uint8 rows (the R, G, B 32x32 "
                         "planes) and n labels")
    if data.dtype != np.uint8:
        raise ValueError(f"{src!r}: {name} has data of dtype {data.dtype}; a CIFAR-10 batch "
                         "holds uint8 pixels")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise ValueError(f"{src!r}: {name} has labels outside 0..9 ({labels.min()}..{labels.max()})")
    return data.reshape(-1, 3, 32, 32), labels


__all__ = ["LabelledImages", "load_cifar10", "is_cifar10", "CIFAR10_ACCEPTED", "CIFAR10_BATCHES"]
