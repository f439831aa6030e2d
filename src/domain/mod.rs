//! Types that can only hold valid values.
pub mod batch;
pub mod delivery;
pub mod json;
pub mod labels;
pub mod lease;
pub mod lease_token;
pub mod mark;
pub mod packet;
pub mod packet_id;
pub mod page_token;
pub mod subscribe;
pub mod user_page;

pub use delivery::DeliveryStatus;
pub use labels::{LegacyState, SenderRole, SystemType};
pub use packet::{FieldViolation, Packet, PacketDraft};
pub use packet_id::PacketId;
