//! The image-folder transforms against Pillow, independently: kutta resamples as Pillow's
//! bilinear filter does (integer arithmetic, `data::transform`), so timm/torchvision's evaluation
//! transform (`Resize(⌊224/0.875⌋ = 256)` + `CenterCrop(224)`) and a RandomResizedCrop's crop +
//! resize + flip, run by torchvision on a PIL image, must give the same bytes. Needs the PyTorch
//! venv of the README (torchvision brings Pillow); otherwise SKIPPED.

use std::process::Command;

mod common;

use common::torch_python_with;
use kutta_trainer::data::transform::{resample, resize_center_crop, CropBox, Src};

const PY: &str = r#"
import sys, numpy as np
from PIL import Image
import torchvision.transforms as T
import torchvision.transforms.functional as F
raw, w, h, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
img = Image.frombytes("RGB", (w, h), open(raw, "rb").read())
ev = T.Compose([T.Resize(256, interpolation=T.InterpolationMode.BILINEAR), T.CenterCrop(224)])(img)
rr = F.hflip(F.resized_crop(img, 30, 50, 200, 300, [224, 224], interpolation=T.InterpolationMode.BILINEAR))
chw = lambda im: np.asarray(im, dtype=np.uint8).transpose(2, 0, 1).tobytes()
open(out, "wb").write(chw(ev) + chw(rr))
"#;

#[test]
fn eval_and_rrc_transforms_match_pillow() {
    let Some(python) = torch_python_with(&["PIL", "torchvision", "numpy"]) else {
        eprintln!(
            "SKIPPED: the Pillow comparison needs torchvision and Pillow in the PyTorch venv \
             (~/.cache/kutta/torch-venv/bin/pip install torch torchvision)"
        );
        return;
    };
    // A 500×375 RGB image: smooth gradients with a deterministic texture.
    let (w, h) = (500usize, 375usize);
    let mut hwc = vec![0u8; w * h * 3];
    for y in 0..h {
        for x in 0..w {
            let t = ((x * 7919 + y * 104_729) % 61) as f64;
            for c in 0..3 {
                let v = 128.0 + 90.0 * ((x as f64 / 37.0 + c as f64).sin() * (y as f64 / 23.0).cos()) + t - 30.0;
                hwc[(y * w + x) * 3 + c] = v.clamp(0.0, 255.0) as u8;
            }
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let (raw, out) = (dir.path().join("img.rgb"), dir.path().join("pillow.bin"));
    std::fs::write(&raw, &hwc).unwrap();
    let o = Command::new(python)
        .args(["-c", PY, raw.to_str().unwrap(), &w.to_string(), &h.to_string(), out.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let pillow = std::fs::read(&out).unwrap();
    let n = 3 * 224 * 224;
    let src = Src::hwc(&hwc, 3, h, w);
    let (mut scratch, mut ev, mut rr) = (Vec::new(), vec![0u8; n], vec![0u8; n]);
    resize_center_crop(src, 224, &mut scratch, &mut ev);
    let crop = CropBox { top: 30, left: 50, h: 200, w: 300 };
    resample(src, crop, (224, 224), (0, 0, 224, 224), true, &mut scratch, &mut rr);
    for (name, ours, theirs) in [("eval", &ev, &pillow[..n]), ("rrc + flip", &rr, &pillow[n..])] {
        let diff = ours.iter().zip(theirs).filter(|(a, b)| a != b).count();
        let max = ours.iter().zip(theirs).map(|(a, b)| (*a as i32 - *b as i32).abs()).max().unwrap();
        eprintln!("{name}: {diff} of {n} bytes differ from Pillow's (max |Δ| {max})");
        assert_eq!(diff, 0, "{name}: {diff} bytes differ from Pillow's, max |Δ| {max}");
    }
}
