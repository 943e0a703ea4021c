//! `rollcall hipache-sync` (not yet implemented).

use crate::cli::HipacheArgs;

pub async fn run(_args: HipacheArgs) -> Result<u8, (u8, String)> {
    Err((2, "rollcall hipache-sync is not implemented yet".into()))
}
