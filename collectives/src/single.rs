//! The single-process communicator: a world of one rank, where every collective is the
//! identity. Every multi-rank code path runs through it unchanged, as llm.c's multi-GPU entry
//! points become no-ops with one process.

use crate::{CommError, Communicator, Result};

#[derive(Clone, Copy, Debug, Default)]
pub struct SingleProcess;

impl Communicator for SingleProcess {
    fn name(&self) -> &'static str {
        "single"
    }
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&self, _buf: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn all_reduce_sum_f64(&self, x: f64) -> Result<f64> {
        Ok(x)
    }
    fn broadcast(&self, _buf: &mut [f32], root: usize) -> Result<()> {
        if root != 0 {
            return Err(CommError::RootOutsideWorld { rank: 0, op: "broadcast", root, world: 1 });
        }
        Ok(())
    }
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collectives_are_identity() {
        let c = SingleProcess;
        let mut b = vec![1.0f32, -2.0];
        c.all_reduce_sum(&mut b).unwrap();
        assert_eq!(b, vec![1.0, -2.0]);
        assert_eq!(c.all_reduce_sum_f64(2.5).unwrap(), 2.5);
        assert!(c.broadcast(&mut b, 1).is_err());
        assert!(c.is_writer());
        assert_eq!(c.world_size(), 1);
    }
}
