from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Pipe(_message.Message):
    __slots__ = ("name", "mode")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    name: str
    mode: str
    def __init__(self, name: _Optional[str] = ..., mode: _Optional[str] = ...) -> None: ...

class PipeRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class PipeInfo(_message.Message):
    __slots__ = ("pipe", "producers", "consumers", "epoch")
    PIPE_FIELD_NUMBER: _ClassVar[int]
    PRODUCERS_FIELD_NUMBER: _ClassVar[int]
    CONSUMERS_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    pipe: Pipe
    producers: _containers.RepeatedCompositeFieldContainer[Endpoint]
    consumers: _containers.RepeatedCompositeFieldContainer[Endpoint]
    epoch: int
    def __init__(self, pipe: _Optional[_Union[Pipe, _Mapping]] = ..., producers: _Optional[_Iterable[_Union[Endpoint, _Mapping]]] = ..., consumers: _Optional[_Iterable[_Union[Endpoint, _Mapping]]] = ..., epoch: _Optional[int] = ...) -> None: ...

class Endpoint(_message.Message):
    __slots__ = ("pipe", "role", "name", "group", "address")
    PIPE_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    pipe: str
    role: str
    name: str
    group: str
    address: str
    def __init__(self, pipe: _Optional[str] = ..., role: _Optional[str] = ..., name: _Optional[str] = ..., group: _Optional[str] = ..., address: _Optional[str] = ...) -> None: ...

class Lease(_message.Message):
    __slots__ = ("known", "lease_s", "epoch")
    KNOWN_FIELD_NUMBER: _ClassVar[int]
    LEASE_S_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    known: bool
    lease_s: float
    epoch: int
    def __init__(self, known: _Optional[bool] = ..., lease_s: _Optional[float] = ..., epoch: _Optional[int] = ...) -> None: ...

class Empty(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PipeList(_message.Message):
    __slots__ = ("pipes",)
    PIPES_FIELD_NUMBER: _ClassVar[int]
    pipes: _containers.RepeatedCompositeFieldContainer[Pipe]
    def __init__(self, pipes: _Optional[_Iterable[_Union[Pipe, _Mapping]]] = ...) -> None: ...
