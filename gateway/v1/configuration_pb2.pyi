from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

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

class WatchPartsRequest(_message.Message):
    __slots__ = ("instance", "server", "subsystems")
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    SERVER_FIELD_NUMBER: _ClassVar[int]
    SUBSYSTEMS_FIELD_NUMBER: _ClassVar[int]
    instance: str
    server: str
    subsystems: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, instance: _Optional[str] = ..., server: _Optional[str] = ..., subsystems: _Optional[_Iterable[str]] = ...) -> None: ...

class PartsUpdate(_message.Message):
    __slots__ = ("directory", "base_version", "catalogue_gzip", "bucket_digests", "changed", "buckets")
    DIRECTORY_FIELD_NUMBER: _ClassVar[int]
    BASE_VERSION_FIELD_NUMBER: _ClassVar[int]
    CATALOGUE_GZIP_FIELD_NUMBER: _ClassVar[int]
    BUCKET_DIGESTS_FIELD_NUMBER: _ClassVar[int]
    CHANGED_FIELD_NUMBER: _ClassVar[int]
    BUCKETS_FIELD_NUMBER: _ClassVar[int]
    directory: SignedConfiguration
    base_version: int
    catalogue_gzip: bytes
    bucket_digests: bytes
    changed: _containers.RepeatedCompositeFieldContainer[BucketDigest]
    buckets: _containers.RepeatedCompositeFieldContainer[Bucket]
    def __init__(self, directory: _Optional[_Union[SignedConfiguration, _Mapping]] = ..., base_version: _Optional[int] = ..., catalogue_gzip: _Optional[bytes] = ..., bucket_digests: _Optional[bytes] = ..., changed: _Optional[_Iterable[_Union[BucketDigest, _Mapping]]] = ..., buckets: _Optional[_Iterable[_Union[Bucket, _Mapping]]] = ...) -> None: ...

class BucketDigest(_message.Message):
    __slots__ = ("bucket", "sha256")
    BUCKET_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    bucket: int
    sha256: bytes
    def __init__(self, bucket: _Optional[int] = ..., sha256: _Optional[bytes] = ...) -> None: ...

class Bucket(_message.Message):
    __slots__ = ("bucket", "gzip_content")
    BUCKET_FIELD_NUMBER: _ClassVar[int]
    GZIP_CONTENT_FIELD_NUMBER: _ClassVar[int]
    bucket: int
    gzip_content: bytes
    def __init__(self, bucket: _Optional[int] = ..., gzip_content: _Optional[bytes] = ...) -> None: ...
