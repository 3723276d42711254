//! Aspect-ratio buckets (`--aspect-buckets`, as kohya's sd-scripts): photos keep their shape.
//! Each goes to the bucket (width and height multiples of 64, area about `resolution^2`, sides
//! at most 4:1) nearest its aspect ratio among those it covers, so it is only ever shrunk; a
//! photo smaller than every such bucket gets its own size, cut down to multiples of 64. Batches
//! are drawn within one bucket ([`epoch_order`]).

use std::collections::BTreeMap;

use sample::NoiseRng;

/// Bucket sides are multiples of this (8 latent cells: every UNet level divides them).
pub const STEP: usize = 64;

/// The most elongated bucket, long side over short side.
const MAX_ASPECT: usize = 4;

/// A bucket's size in pixels, (width, height).
pub type Bucket = (usize, usize);

/// The buckets of a training resolution: for each width (a multiple of 64), the tallest height
/// (a multiple of 64) whose area is at most `resolution^2`, sides at most 4:1 apart.
pub fn buckets(resolution: usize) -> Vec<Bucket> {
    let area = resolution * resolution;
    let mut out = Vec::new();
    let mut w = STEP;
    while w * STEP <= area {
        let h = area / w / STEP * STEP;
        if h >= STEP && w.max(h) <= MAX_ASPECT * w.min(h) {
            out.push((w, h));
        }
        w += STEP;
    }
    if out.is_empty() {
        out.push((STEP, STEP));
    }
    out
}

/// The bucket of a photo of `width x height` pixels: the one nearest its aspect ratio (in log
/// ratio) among `candidates` that fit inside it; else its own size, shrunk to the buckets' area
/// if larger, cut down to multiples of 64 (at least 64).
pub fn bucket_for((width, height): (usize, usize), candidates: &[Bucket]) -> Bucket {
    let area = candidates.iter().map(|&(w, h)| w * h).max().unwrap_or(0);
    let shrink = (area as f64 / (width * height) as f64).sqrt().min(1.0);
    let own = |side: usize| ((side as f64 * shrink) as usize / STEP * STEP).max(STEP);
    let aspect = (width as f64 / height as f64).ln();
    let distance = |&(w, h): &Bucket| ((w as f64 / h as f64).ln() - aspect).abs();
    candidates
        .iter()
        .filter(|&&(w, h)| w <= width && h <= height)
        .min_by(|a, b| distance(a).total_cmp(&distance(b)))
        .copied()
        .unwrap_or((own(width), own(height)))
}

/// One epoch's order of examples: each image `repeats` times, shuffled; with `buckets` (each
/// example's bucket) grouped into batches of `batch` from one bucket, the batches shuffled, a
/// bucket's last batch filled up with its own examples from the start. Without buckets the
/// order is the shuffle alone (runs from before buckets existed draw the same numbers).
pub fn epoch_order(
    n: usize,
    repeats: usize,
    batch: usize,
    buckets: Option<&[Bucket]>,
    rng: &mut NoiseRng,
) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n * repeats).map(|k| k % n).collect();
    shuffle(&mut order, rng);
    let Some(buckets) = buckets else {
        return order;
    };
    let mut groups: BTreeMap<Bucket, Vec<usize>> = BTreeMap::new();
    for i in order {
        groups.entry(buckets[i]).or_default().push(i);
    }
    let mut batches: Vec<Vec<usize>> = Vec::new();
    for members in groups.values() {
        for chunk in members.chunks(batch) {
            let mut b = chunk.to_vec();
            b.extend(members.iter().cycle().take(batch - chunk.len()));
            batches.push(b);
        }
    }
    shuffle(&mut batches, rng);
    batches.concat()
}

/// Fisher-Yates with the run's generator.
fn shuffle<T>(v: &mut [T], rng: &mut NoiseRng) {
    for i in (1..v.len()).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        v.swap(i, j);
    }
}

/// How many examples each bucket holds, for the log: `(bucket, count)` by size.
pub fn counts(buckets: &[Bucket]) -> Vec<(Bucket, usize)> {
    let mut c: BTreeMap<Bucket, usize> = BTreeMap::new();
    for b in buckets {
        *c.entry(*b).or_default() += 1;
    }
    c.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sd15_buckets_are_kohyas() {
        let b = buckets(512);
        assert_eq!(b.first(), Some(&(256, 1024)));
        assert_eq!(b.last(), Some(&(1024, 256)));
        assert!(b.contains(&(512, 512)) && b.contains(&(640, 384)) && b.contains(&(384, 640)));
        for (w, h) in b {
            assert!(w % 64 == 0 && h % 64 == 0 && w * h <= 512 * 512, "{w}x{h}");
            assert!(w * h > 512 * 512 - 64 * w.max(h), "{w}x{h} is too small");
        }
    }

    #[test]
    fn photos_go_to_the_nearest_aspect_and_are_never_upscaled() {
        let b = buckets(512);
        assert_eq!(bucket_for((3000, 2000), &b), (640, 384)); // 1.5 -> 1.67 (576x448 is 1.29)
        assert_eq!(bucket_for((2000, 3000), &b), (384, 640));
        assert_eq!(bucket_for((1024, 1024), &b), (512, 512));
        // fits no bucket: its own size, cut to multiples of 64
        assert_eq!(bucket_for((400, 300), &b), (384, 256));
        // a long panorama lower than the 1024x256 bucket: its own shape, shrunk to the area
        assert_eq!(bucket_for((2000, 250), &b), (1408, 128));
        for size in [
            (3000, 2000),
            (700, 500),
            (513, 2000),
            (400, 300),
            (2000, 250),
        ] {
            let (w, h) = bucket_for(size, &b);
            assert!(w <= size.0 && h <= size.1, "{size:?} -> {w}x{h}");
        }
    }

    #[test]
    fn batches_stay_within_a_bucket() {
        let sizes = [(512, 512), (640, 384), (512, 512), (640, 384), (384, 640)];
        let mut rng = NoiseRng::new(3);
        let order = epoch_order(5, 3, 2, Some(&sizes), &mut rng);
        assert_eq!(order.len() % 2, 0);
        for pair in order.chunks(2) {
            assert_eq!(sizes[pair[0]], sizes[pair[1]], "{order:?}");
        }
        for i in 0..5 {
            assert!(order.iter().filter(|&&k| k == i).count() >= 3, "{order:?}");
        }
        // without buckets: the plain shuffle of before
        let mut a = NoiseRng::new(3);
        let plain = epoch_order(5, 3, 2, None, &mut a);
        assert_eq!(plain.len(), 15);
    }
}
