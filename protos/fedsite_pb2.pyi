from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Credentials(_message.Message):
    __slots__ = ("client_id", "session_key")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_KEY_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    session_key: str
    def __init__(self, client_id: _Optional[str] = ..., session_key: _Optional[str] = ...) -> None: ...

class EnrollRequest(_message.Message):
    __slots__ = ("token", "client_name")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    CLIENT_NAME_FIELD_NUMBER: _ClassVar[int]
    token: str
    client_name: str
    def __init__(self, token: _Optional[str] = ..., client_name: _Optional[str] = ...) -> None: ...

class EnrollReply(_message.Message):
    __slots__ = ("credentials", "job_name", "package_sha256", "package_size", "heartbeat_interval_s")
    CREDENTIALS_FIELD_NUMBER: _ClassVar[int]
    JOB_NAME_FIELD_NUMBER: _ClassVar[int]
    PACKAGE_SHA256_FIELD_NUMBER: _ClassVar[int]
    PACKAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    credentials: Credentials
    job_name: str
    package_sha256: str
    package_size: int
    heartbeat_interval_s: int
    def __init__(self, credentials: _Optional[_Union[Credentials, _Mapping]] = ..., job_name: _Optional[str] = ..., package_sha256: _Optional[str] = ..., package_size: _Optional[int] = ..., heartbeat_interval_s: _Optional[int] = ...) -> None: ...

class FetchRequest(_message.Message):
    __slots__ = ("credentials", "task_id", "offset", "without_base_weights")
    CREDENTIALS_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    WITHOUT_BASE_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    credentials: Credentials
    task_id: str
    offset: int
    without_base_weights: bool
    def __init__(self, credentials: _Optional[_Union[Credentials, _Mapping]] = ..., task_id: _Optional[str] = ..., offset: _Optional[int] = ..., without_base_weights: _Optional[bool] = ...) -> None: ...

class Chunk(_message.Message):
    __slots__ = ("data", "offset", "total_size", "sha256")
    DATA_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    offset: int
    total_size: int
    sha256: str
    def __init__(self, data: _Optional[bytes] = ..., offset: _Optional[int] = ..., total_size: _Optional[int] = ..., sha256: _Optional[str] = ...) -> None: ...

class PollRequest(_message.Message):
    __slots__ = ("credentials",)
    CREDENTIALS_FIELD_NUMBER: _ClassVar[int]
    credentials: Credentials
    def __init__(self, credentials: _Optional[_Union[Credentials, _Mapping]] = ...) -> None: ...

class Task(_message.Message):
    __slots__ = ("kind", "task_id", "round", "stage", "size", "sha256", "retry_after_ms", "message", "deadline_s")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        WAIT: _ClassVar[Task.Kind]
        RUN: _ClassVar[Task.Kind]
        DONE: _ClassVar[Task.Kind]
    WAIT: Task.Kind
    RUN: Task.Kind
    DONE: Task.Kind
    KIND_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_MS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_S_FIELD_NUMBER: _ClassVar[int]
    kind: Task.Kind
    task_id: str
    round: int
    stage: str
    size: int
    sha256: str
    retry_after_ms: int
    message: str
    deadline_s: float
    def __init__(self, kind: _Optional[_Union[Task.Kind, str]] = ..., task_id: _Optional[str] = ..., round: _Optional[int] = ..., stage: _Optional[str] = ..., size: _Optional[int] = ..., sha256: _Optional[str] = ..., retry_after_ms: _Optional[int] = ..., message: _Optional[str] = ..., deadline_s: _Optional[float] = ...) -> None: ...

class UploadChunk(_message.Message):
    __slots__ = ("credentials", "task_id", "total_size", "sha256", "offset", "data")
    CREDENTIALS_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    credentials: Credentials
    task_id: str
    total_size: int
    sha256: str
    offset: int
    data: bytes
    def __init__(self, credentials: _Optional[_Union[Credentials, _Mapping]] = ..., task_id: _Optional[str] = ..., total_size: _Optional[int] = ..., sha256: _Optional[str] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class UploadReply(_message.Message):
    __slots__ = ("accepted", "message")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    message: str
    def __init__(self, accepted: _Optional[bool] = ..., message: _Optional[str] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("credentials", "task_id", "status")
    CREDENTIALS_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    credentials: Credentials
    task_id: str
    status: str
    def __init__(self, credentials: _Optional[_Union[Credentials, _Mapping]] = ..., task_id: _Optional[str] = ..., status: _Optional[str] = ...) -> None: ...

class HeartbeatReply(_message.Message):
    __slots__ = ("task_alive",)
    TASK_ALIVE_FIELD_NUMBER: _ClassVar[int]
    task_alive: bool
    def __init__(self, task_alive: _Optional[bool] = ...) -> None: ...
