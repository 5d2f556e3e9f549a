"""The lockstep protocol, sans-IO: frames, messages, state machines.

Bytes in, typed messages out (and back). No sockets, no hio, no clock: the
transport moves the bytes; the worker and supervisor cores act on the messages.
The wire format is specified in docs/protocol.md; keep the two in step.

=============  ==============================================================
``fields``     limits and one validator per field type
``messages``   one dataclass per frame type (HELLO ... DATA)
``frames``     encode and decode: bytes ⇄ messages, bounded and validated
``machines``   the two ends of a control connection as transition tables
``versions``   what a run's digests depend on (checked at HELLO)
``arrays``     numpy arrays as msgpack ext type 1 (payloads, results, states)
=============  ==============================================================
"""

from hiocluster.protocol.fields import (
                     DIGEST_SIZE,
                     MAX_BYE_FRAME,
                     MAX_CONTROL_FRAME,
                     MAX_DATA_FRAME,
                     MAX_SETUP_FRAME,
                     NAME,
                     UINT,
                     is_name,
)
from hiocluster.protocol.frames import (
                     VERSION,
                     check_control_value,
                     check_size,
                     check_unpacks,
                     claimed_by,
                     decode,
                     decode_data,
                     encode,
                     from_body,
                     read_data,
                     reload_data,
)
from hiocluster.protocol.machines import (
                     CHILD_TRANSITIONS,
                     PARENT_TRANSITIONS,
                     ChildMachine,
                     ChildState,
                     ParentMachine,
                     ParentState,
)
from hiocluster.protocol.messages import (
                     COMMANDS,
                     FROM_AGENT,
                     FROM_REPLICA,
                     MESSAGE_TYPES,
                     METRIC_KINDS,
                     TO_AGENT,
                     TO_REPLICA,
                     Answer,
                     Assign,
                     Bye,
                     Chunk,
                     Close,
                     Command,
                     Data,
                     Done,
                     Error,
                     Exited,
                     Grant,
                     Hello,
                     Join,
                     Launch,
                     Launched,
                     Load,
                     Message,
                     Output,
                     Peer,
                     Ping,
                     Progress,
                     Ready,
                     Setup,
                     Signal,
                     Standby,
                     Stop,
)
from hiocluster.protocol.versions import local_versions, mismatches

__all__ = [
    "VERSION", "DIGEST_SIZE", "MAX_CONTROL_FRAME", "MAX_BYE_FRAME", "MAX_SETUP_FRAME", "MAX_DATA_FRAME",
    "NAME", "UINT", "is_name", "encode", "decode", "decode_data", "read_data", "reload_data", "from_body",
    "check_unpacks", "check_size", "check_control_value", "claimed_by", "METRIC_KINDS",
    "Message", "Hello", "Setup", "Ready", "Grant", "Progress", "Done", "Stop", "Bye",
    "Chunk", "Error", "Data", "Peer", "Launch", "Launched", "Signal", "Close", "Exited",
    "Output", "Ping",
    "Join", "Load", "Standby", "Assign", "Command", "Answer", "COMMANDS", "FROM_REPLICA", "TO_REPLICA",
    "TO_AGENT", "FROM_AGENT", "MESSAGE_TYPES", "ChildMachine", "ParentMachine", "ChildState",
    "ParentState", "CHILD_TRANSITIONS", "PARENT_TRANSITIONS", "local_versions", "mismatches",
]
