//! `rollcall status` (not yet implemented).

use crate::cli::StatusArgs;

pub async fn run(_args: StatusArgs) -> Result<u8, (u8, String)> {
    Err((2, "rollcall status is not implemented yet".into()))
}
