//! How a weight is seen as a set of small "filters" (DESIGN.md 1.1 and 1.3).
//!
//! A convolution weight `[co, ci, kh, kw]` is `N = co*ci` filters of `d = kh*kw` numbers. A linear
//! weight `[co, ci]` is cut into `bo x bi` channel blocks: `N = (co/bo)*(ci/bi)` filters of
//! `d = bo*bi` numbers. Atoms, coefficients and adapters only ever see the `[N, d]` filter matrix
//! (or its grouped form `[g, N/g, d]`, one group per input channel or input block column); this
//! module is the one place that knows how to go between it and the weight.
//!
//! Filter rows are ordered output-major: row `o*ci + i` for a conv (a free reshape of the weight),
//! row `p*(ci/bi) + q` for the block in block-row `p` and block-column `q` of a linear weight, with
//! each block flattened row-major.

use std::fmt;
use std::str::FromStr;

use candle_core::{DType, Device, Tensor};

use crate::{Error, Result};

/// The channel block a linear weight is cut into (DESIGN.md 1.3); 4x4 by default.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Block {
    /// Rows of a block (output channels), `bo`.
    pub rows: usize,
    /// Columns of a block (input channels), `bi`.
    pub cols: usize,
}

impl Default for Block {
    fn default() -> Self {
        Block { rows: 4, cols: 4 }
    }
}

impl fmt::Display for Block {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}x{}", self.rows, self.cols)
    }
}

impl FromStr for Block {
    type Err = Error;

    /// Parses `BOxBI`, e.g. `4x4`.
    fn from_str(s: &str) -> Result<Self> {
        let bad = || {
            Error::invalid(
                "block",
                s,
                "expected ROWSxCOLS with both at least 1, e.g. 4x4",
            )
        };
        let (r, c) = s.split_once('x').ok_or_else(bad)?;
        let rows: usize = r.trim().parse().map_err(|_| bad())?;
        let cols: usize = c.trim().parse().map_err(|_| bad())?;
        if rows == 0 || cols == 0 {
            return Err(bad());
        }
        Ok(Block { rows, cols })
    }
}

/// The filter view of one weight.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Layout {
    /// A convolution weight `[co, ci, kh, kw]`; filters are its `kh x kw` kernels.
    Conv {
        /// Output channels.
        co: usize,
        /// Input channels (per group; grouped convs are seen as their weight tensor).
        ci: usize,
        /// Kernel height.
        kh: usize,
        /// Kernel width.
        kw: usize,
    },
    /// A linear weight `[co, ci]`; filters are its `bo x bi` blocks.
    Linear {
        /// Output features.
        co: usize,
        /// Input features.
        ci: usize,
        /// Block rows.
        bo: usize,
        /// Block columns.
        bi: usize,
    },
}

impl Layout {
    /// The layout of a weight of this shape: 4-d is a convolution, 2-d a linear layer cut into
    /// `block`s. Errors when the block does not divide a linear weight or a dimension is zero.
    pub fn from_shape(shape: &[usize], block: Block) -> Result<Self> {
        if shape.contains(&0) {
            return Err(Error::UnsupportedShape {
                shape: shape.to_vec(),
            });
        }
        match *shape {
            [co, ci, kh, kw] => Ok(Layout::Conv { co, ci, kh, kw }),
            [co, ci] => {
                let Block { rows: bo, cols: bi } = block;
                if co % bo != 0 || ci % bi != 0 {
                    return Err(Error::BlockSize { co, ci, bo, bi });
                }
                Ok(Layout::Linear { co, ci, bo, bi })
            }
            _ => Err(Error::UnsupportedShape {
                shape: shape.to_vec(),
            }),
        }
    }

    /// The weight's shape.
    pub fn shape(&self) -> Vec<usize> {
        match *self {
            Layout::Conv { co, ci, kh, kw } => vec![co, ci, kh, kw],
            Layout::Linear { co, ci, .. } => vec![co, ci],
        }
    }

    /// Output and input channels `(co, ci)`.
    pub fn channels(&self) -> (usize, usize) {
        match *self {
            Layout::Conv { co, ci, .. } | Layout::Linear { co, ci, .. } => (co, ci),
        }
    }

    /// Numbers per filter, `d`.
    pub fn filter_dim(&self) -> usize {
        match *self {
            Layout::Conv { kh, kw, .. } => kh * kw,
            Layout::Linear { bo, bi, .. } => bo * bi,
        }
    }

    /// Number of filters, `N`.
    pub fn num_filters(&self) -> usize {
        match *self {
            Layout::Conv { co, ci, .. } => co * ci,
            Layout::Linear { co, ci, bo, bi } => (co / bo) * (ci / bi),
        }
    }

    /// Number of input groups `g` (input channels of a conv, block columns of a linear weight);
    /// recursive atoms learn one set of atom updates per group (DESIGN.md 1.2).
    pub fn groups(&self) -> usize {
        match *self {
            Layout::Conv { ci, .. } => ci,
            Layout::Linear { ci, bi, .. } => ci / bi,
        }
    }

    /// Total number of weight elements.
    pub fn numel(&self) -> usize {
        self.num_filters() * self.filter_dim()
    }

    /// Whether this is a convolution layout.
    pub fn is_conv(&self) -> bool {
        matches!(self, Layout::Conv { .. })
    }

    fn check(&self, w: &Tensor) -> Result<()> {
        if w.dims() != self.shape().as_slice() {
            return Err(Error::UnsupportedShape {
                shape: w.dims().to_vec(),
            });
        }
        Ok(())
    }

    /// `W -> Wr`: the weight as its filter matrix `[N, d]` (rows output-major).
    pub fn to_filters(&self, w: &Tensor) -> Result<Tensor> {
        self.check(w)?;
        let (n, d) = (self.num_filters(), self.filter_dim());
        Ok(match *self {
            Layout::Conv { .. } => w.reshape((n, d))?,
            Layout::Linear { co, ci, bo, bi } => w
                .reshape((co / bo, bo, ci / bi, bi))?
                .transpose(1, 2)?
                .contiguous()?
                .reshape((n, d))?,
        })
    }

    /// `Wr -> W`: the inverse of [`Layout::to_filters`].
    pub fn from_filters(&self, f: &Tensor) -> Result<Tensor> {
        Ok(match *self {
            Layout::Conv { .. } => f.reshape(self.shape())?,
            Layout::Linear { co, ci, bo, bi } => f
                .reshape((co / bo, ci / bi, bo, bi))?
                .transpose(1, 2)?
                .contiguous()?
                .reshape((co, ci))?,
        })
    }

    /// The weight as grouped filters `[g, N/g, d]`: group `i` holds every filter that reads input
    /// channel (or block column) `i`, in output order.
    pub fn to_grouped(&self, w: &Tensor) -> Result<Tensor> {
        self.check(w)?;
        let d = self.filter_dim();
        Ok(match *self {
            Layout::Conv { co, ci, .. } => w.reshape((co, ci, d))?.transpose(0, 1)?.contiguous()?,
            Layout::Linear { co, ci, bo, bi } => w
                .reshape((co / bo, bo, ci / bi, bi))?
                .permute((2, 0, 1, 3))?
                .contiguous()?
                .reshape((ci / bi, co / bo, d))?,
        })
    }

    /// The inverse of [`Layout::to_grouped`].
    pub fn from_grouped(&self, g: &Tensor) -> Result<Tensor> {
        Ok(match *self {
            Layout::Conv { .. } => g.transpose(0, 1)?.contiguous()?.reshape(self.shape())?,
            Layout::Linear { co, ci, bo, bi } => g
                .reshape((ci / bi, co / bo, bo, bi))?
                .permute((1, 2, 0, 3))?
                .contiguous()?
                .reshape((co, ci))?,
        })
    }

    /// The filter matrix `[N, d]` as row-major `f64` on the host, for the dictionary solvers.
    pub fn filters_f64(&self, w: &Tensor) -> Result<Vec<f64>> {
        self.check(w)?;
        host_f64(&self.to_filters(w)?)
    }
}

/// The numbers of `t`, row-major, as `f64` on the host: copied to the host first and widened
/// there, because Metal has no f64.
pub fn host_f64(t: &Tensor) -> Result<Vec<f64>> {
    Ok(t.to_device(&Device::Cpu)?
        .to_dtype(DType::F64)?
        .flatten_all()?
        .to_vec1::<f64>()?)
}

impl fmt::Display for Layout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Layout::Conv { co, ci, kh, kw } => write!(f, "conv [{co}, {ci}, {kh}, {kw}]"),
            Layout::Linear { co, ci, bo, bi } => {
                write!(f, "linear [{co}, {ci}] in {bo}x{bi} blocks")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn iota(shape: &[usize]) -> Tensor {
        let n: usize = shape.iter().product();
        Tensor::arange(0f32, n as f32, &Device::Cpu)
            .unwrap()
            .reshape(shape)
            .unwrap()
    }

    #[test]
    fn linear_filters_are_row_major_blocks() {
        let l = Layout::from_shape(&[4, 6], Block { rows: 2, cols: 3 }).unwrap();
        let f = l
            .to_filters(&iota(&[4, 6]))
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        // block (0, 0) = rows 0..2, cols 0..3 of the 4x6 matrix numbered row-major.
        assert_eq!(f[0], vec![0., 1., 2., 6., 7., 8.]);
        // block (0, 1) = rows 0..2, cols 3..6.
        assert_eq!(f[1], vec![3., 4., 5., 9., 10., 11.]);
        // block (1, 0) = rows 2..4, cols 0..3.
        assert_eq!(f[2], vec![12., 13., 14., 18., 19., 20.]);
    }

    #[test]
    fn filters_and_groups_round_trip() {
        for (shape, block) in [
            (vec![5, 3, 3, 2], Block::default()),
            (vec![7, 2, 1, 1], Block::default()),
            (vec![8, 12], Block { rows: 4, cols: 3 }),
            (vec![6, 4], Block { rows: 1, cols: 1 }),
        ] {
            let l = Layout::from_shape(&shape, block).unwrap();
            let w = iota(&shape);
            let back = l.from_filters(&l.to_filters(&w).unwrap()).unwrap();
            assert_eq!(back.to_vec1_any(), w.to_vec1_any(), "{l}");
            let g = l.to_grouped(&w).unwrap();
            assert_eq!(
                g.dims(),
                &[l.groups(), l.num_filters() / l.groups(), l.filter_dim()]
            );
            let back = l.from_grouped(&g).unwrap();
            assert_eq!(back.to_vec1_any(), w.to_vec1_any(), "{l}");
        }
    }

    #[test]
    fn grouped_linear_holds_one_block_column_per_group() {
        let l = Layout::from_shape(&[4, 6], Block { rows: 2, cols: 3 }).unwrap();
        let g = l
            .to_grouped(&iota(&[4, 6]))
            .unwrap()
            .to_vec3::<f32>()
            .unwrap();
        // group 1 = block column 1: blocks (0, 1) and (1, 1).
        assert_eq!(g[1][0], vec![3., 4., 5., 9., 10., 11.]);
        assert_eq!(g[1][1], vec![15., 16., 17., 21., 22., 23.]);
    }

    #[test]
    fn block_that_does_not_divide_is_an_error() {
        let e = Layout::from_shape(&[6, 10], Block::default()).unwrap_err();
        assert!(
            matches!(
                e,
                Error::BlockSize {
                    co: 6,
                    ci: 10,
                    bo: 4,
                    bi: 4
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("4x4 does not divide"), "{e}");
        assert!(Layout::from_shape(&[3, 3, 3], Block::default()).is_err());
        assert!(Layout::from_shape(&[0, 3, 3, 3], Block::default()).is_err());
        assert!("4x".parse::<Block>().is_err());
        assert!("0x4".parse::<Block>().is_err());
        assert_eq!("2x8".parse::<Block>().unwrap(), Block { rows: 2, cols: 8 });
    }

    trait AnyVec {
        fn to_vec1_any(&self) -> Vec<f32>;
    }
    impl AnyVec for Tensor {
        fn to_vec1_any(&self) -> Vec<f32> {
            self.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        }
    }
}
