use nalgebra::DMatrix;
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};
use std::time::Instant;
fn main() {
    let n: usize = std::env::args().nth(1).unwrap().parse().unwrap();
    let mut rng = rand_pcg::Pcg64::seed_from_u64(1);
    let q = DMatrix::<f64>::from_fn(n, n, |_, _| StandardNormal.sample(&mut rng));
    let g = rmt_core::spectra::gram(&q, 1.0 / n as f64).unwrap();
    for _ in 0..2 {
        let t = Instant::now();
        let i = rmt_core::linalg::inertia(&g, 4.0).unwrap();
        println!("inertia {:?} {:?}", t.elapsed(), i);
        let t = Instant::now();
        let _ = rmt_core::spectra::gram(&q, 1.0 / n as f64).unwrap();
        println!("gram {:?}", t.elapsed());
        let t = Instant::now();
        let _ = &q * q.transpose();
        println!("nalgebra gemm {:?}", t.elapsed());
    }
}
