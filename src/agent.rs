//! `rollcall register` (not yet implemented).

use crate::cli::RegisterArgs;

pub async fn run(_args: RegisterArgs) -> Result<u8, (u8, String)> {
    Err((2, "rollcall register is not implemented yet".into()))
}
