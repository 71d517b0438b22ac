//! What the layers share of HTTP: the bodies they write their own answers in, gRPC answers, the
//! peer address of a request, and the view of a request that pluggable parts decide from.

mod body;
mod grpc;
mod peer;
mod view;

pub use body::{RefusalBody, ResponseBody};
pub(crate) use body::{plain_response, polled_after_completion};
pub(crate) use grpc::{
    GRPC_INVALID_ARGUMENT, GRPC_RESOURCE_EXHAUSTED, GRPC_UNAVAILABLE, grpc_status, is_grpc,
};
pub(crate) use peer::peer_addr;
pub use peer::{PeerAddr, PeerAddrLayer};
pub use view::{RequestView, ResponseView};
