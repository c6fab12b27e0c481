from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetRecordRequest(_message.Message):
    __slots__ = ("national_id",)
    NATIONAL_ID_FIELD_NUMBER: _ClassVar[int]
    national_id: str
    def __init__(self, national_id: _Optional[str] = ...) -> None: ...

class Vaccination(_message.Message):
    __slots__ = ("vaccine", "date")
    VACCINE_FIELD_NUMBER: _ClassVar[int]
    DATE_FIELD_NUMBER: _ClassVar[int]
    vaccine: str
    date: str
    def __init__(self, vaccine: _Optional[str] = ..., date: _Optional[str] = ...) -> None: ...

class VaccinationRecord(_message.Message):
    __slots__ = ("national_id", "vaccinations")
    NATIONAL_ID_FIELD_NUMBER: _ClassVar[int]
    VACCINATIONS_FIELD_NUMBER: _ClassVar[int]
    national_id: str
    vaccinations: _containers.RepeatedCompositeFieldContainer[Vaccination]
    def __init__(self, national_id: _Optional[str] = ..., vaccinations: _Optional[_Iterable[_Union[Vaccination, _Mapping]]] = ...) -> None: ...
