//! A kernel that applies operations to an in-memory state, as a correct kernel would: for tests
//! that run the agent's loop against a real API server without network namespaces.

use wiremesh::model::WgKey;
use wiremesh::reconcile::plan::simulate;
use wiremesh::reconcile::{Kernel, KernelError, Op, OwnedState};

/// The in-memory kernel: its state and the node's public key.
pub struct MemKernel(pub OwnedState, pub WgKey);

impl Kernel for MemKernel {
    async fn read_owned(&mut self) -> Result<OwnedState, KernelError> {
        Ok(self.0.clone())
    }
    async fn apply(&mut self, op: &Op) -> Result<(), KernelError> {
        simulate(&mut self.0, std::slice::from_ref(op), self.1);
        Ok(())
    }
}
