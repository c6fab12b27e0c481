from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class StreamMessage(_message.Message):
    __slots__ = ("open", "data", "close", "refusal", "ocsp_staple")
    OPEN_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    CLOSE_FIELD_NUMBER: _ClassVar[int]
    REFUSAL_FIELD_NUMBER: _ClassVar[int]
    OCSP_STAPLE_FIELD_NUMBER: _ClassVar[int]
    open: StreamOpen
    data: StreamData
    close: SignedEnvelope
    refusal: Refusal
    ocsp_staple: bytes
    def __init__(self, open: _Optional[_Union[StreamOpen, _Mapping]] = ..., data: _Optional[_Union[StreamData, _Mapping]] = ..., close: _Optional[_Union[SignedEnvelope, _Mapping]] = ..., refusal: _Optional[_Union[Refusal, _Mapping]] = ..., ocsp_staple: _Optional[bytes] = ...) -> None: ...

class StreamOpen(_message.Message):
    __slots__ = ("request", "timeout_ms", "traceparent")
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    TRACEPARENT_FIELD_NUMBER: _ClassVar[int]
    request: SignedEnvelope
    timeout_ms: int
    traceparent: bytes
    def __init__(self, request: _Optional[_Union[SignedEnvelope, _Mapping]] = ..., timeout_ms: _Optional[int] = ..., traceparent: _Optional[bytes] = ...) -> None: ...

class StreamData(_message.Message):
    __slots__ = ("seq", "body", "link")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    BODY_FIELD_NUMBER: _ClassVar[int]
    LINK_FIELD_NUMBER: _ClassVar[int]
    seq: int
    body: bytes
    link: bytes
    def __init__(self, seq: _Optional[int] = ..., body: _Optional[bytes] = ..., link: _Optional[bytes] = ...) -> None: ...

class Frames(_message.Message):
    __slots__ = ("frames", "ocsp_staple", "draining")
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    OCSP_STAPLE_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    frames: _containers.RepeatedCompositeFieldContainer[Frame]
    ocsp_staple: bytes
    draining: bool
    def __init__(self, frames: _Optional[_Iterable[_Union[Frame, _Mapping]]] = ..., ocsp_staple: _Optional[bytes] = ..., draining: _Optional[bool] = ...) -> None: ...

class Frame(_message.Message):
    __slots__ = ("correlation_id", "request", "response", "refusal", "timeout_ms", "provider_micros", "backend_micros", "traceparent")
    CORRELATION_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    REFUSAL_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_MICROS_FIELD_NUMBER: _ClassVar[int]
    BACKEND_MICROS_FIELD_NUMBER: _ClassVar[int]
    TRACEPARENT_FIELD_NUMBER: _ClassVar[int]
    correlation_id: int
    request: SignedEnvelope
    response: SignedEnvelope
    refusal: Refusal
    timeout_ms: int
    provider_micros: int
    backend_micros: int
    traceparent: bytes
    def __init__(self, correlation_id: _Optional[int] = ..., request: _Optional[_Union[SignedEnvelope, _Mapping]] = ..., response: _Optional[_Union[SignedEnvelope, _Mapping]] = ..., refusal: _Optional[_Union[Refusal, _Mapping]] = ..., timeout_ms: _Optional[int] = ..., provider_micros: _Optional[int] = ..., backend_micros: _Optional[int] = ..., traceparent: _Optional[bytes] = ...) -> None: ...

class SignedEnvelope(_message.Message):
    __slots__ = ("header", "body", "signature", "signer_certificate", "signer_ocsp")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    BODY_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    SIGNER_CERTIFICATE_FIELD_NUMBER: _ClassVar[int]
    SIGNER_OCSP_FIELD_NUMBER: _ClassVar[int]
    header: bytes
    body: bytes
    signature: bytes
    signer_certificate: bytes
    signer_ocsp: bytes
    def __init__(self, header: _Optional[bytes] = ..., body: _Optional[bytes] = ..., signature: _Optional[bytes] = ..., signer_certificate: _Optional[bytes] = ..., signer_ocsp: _Optional[bytes] = ...) -> None: ...

class Refusal(_message.Message):
    __slots__ = ("code", "message", "message_id")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_ID_FIELD_NUMBER: _ClassVar[int]
    code: str
    message: str
    message_id: str
    def __init__(self, code: _Optional[str] = ..., message: _Optional[str] = ..., message_id: _Optional[str] = ...) -> None: ...
