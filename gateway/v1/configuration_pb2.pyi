from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class FetchRequest(_message.Message):
    __slots__ = ("instance",)
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    instance: str
    def __init__(self, instance: _Optional[str] = ...) -> None: ...

class WatchRequest(_message.Message):
    __slots__ = ("instance", "known_version")
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    KNOWN_VERSION_FIELD_NUMBER: _ClassVar[int]
    instance: str
    known_version: int
    def __init__(self, instance: _Optional[str] = ..., known_version: _Optional[int] = ...) -> None: ...

class SignedConfiguration(_message.Message):
    __slots__ = ("content", "signature", "signer_certificate", "gzip_content")
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    SIGNER_CERTIFICATE_FIELD_NUMBER: _ClassVar[int]
    GZIP_CONTENT_FIELD_NUMBER: _ClassVar[int]
    content: bytes
    signature: bytes
    signer_certificate: bytes
    gzip_content: bytes
    def __init__(self, content: _Optional[bytes] = ..., signature: _Optional[bytes] = ..., signer_certificate: _Optional[bytes] = ..., gzip_content: _Optional[bytes] = ...) -> None: ...

class SignedCheckpoint(_message.Message):
    __slots__ = ("content", "signature")
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    content: bytes
    signature: bytes
    def __init__(self, content: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...

class CheckpointReceipt(_message.Message):
    __slots__ = ("received_at",)
    RECEIVED_AT_FIELD_NUMBER: _ClassVar[int]
    received_at: str
    def __init__(self, received_at: _Optional[str] = ...) -> None: ...
