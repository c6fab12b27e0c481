from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class ExportRequest(_message.Message):
    __slots__ = ("born_since",)
    BORN_SINCE_FIELD_NUMBER: _ClassVar[int]
    born_since: str
    def __init__(self, born_since: _Optional[str] = ...) -> None: ...

class DownloadRequest(_message.Message):
    __slots__ = ("count", "size")
    COUNT_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    count: int
    size: int
    def __init__(self, count: _Optional[int] = ..., size: _Optional[int] = ...) -> None: ...

class UploadSummary(_message.Message):
    __slots__ = ("count", "bytes", "sha256")
    COUNT_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    count: int
    bytes: int
    sha256: str
    def __init__(self, count: _Optional[int] = ..., bytes: _Optional[int] = ..., sha256: _Optional[str] = ...) -> None: ...

class GetPersonRequest(_message.Message):
    __slots__ = ("national_id",)
    NATIONAL_ID_FIELD_NUMBER: _ClassVar[int]
    national_id: str
    def __init__(self, national_id: _Optional[str] = ...) -> None: ...

class Person(_message.Message):
    __slots__ = ("national_id", "given_name", "family_name", "birth_date", "alive")
    NATIONAL_ID_FIELD_NUMBER: _ClassVar[int]
    GIVEN_NAME_FIELD_NUMBER: _ClassVar[int]
    FAMILY_NAME_FIELD_NUMBER: _ClassVar[int]
    BIRTH_DATE_FIELD_NUMBER: _ClassVar[int]
    ALIVE_FIELD_NUMBER: _ClassVar[int]
    national_id: str
    given_name: str
    family_name: str
    birth_date: str
    alive: bool
    def __init__(self, national_id: _Optional[str] = ..., given_name: _Optional[str] = ..., family_name: _Optional[str] = ..., birth_date: _Optional[str] = ..., alive: _Optional[bool] = ...) -> None: ...

class EchoMessage(_message.Message):
    __slots__ = ("payload",)
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    payload: bytes
    def __init__(self, payload: _Optional[bytes] = ...) -> None: ...
