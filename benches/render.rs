//! Render benchmark (not a test): one frame of each view at 200×60 with 4,000 tokens of telemetry
//! of a BlackMamba-2.8B-shaped model (18 Mamba + 18 MoE layers of 8 experts).
//!
//!     cargo bench --bench render

use std::time::Instant;

use blackmamba::tui::app::{App, View};
use blackmamba::tui::demo;
use blackmamba::tui::theme::Theme;
use ratatui::buffer::Buffer;
use ratatui::layout::Rect;

fn main() {
    let mut app = App::new(Theme::default_theme());
    let info = demo::model_info(18, 8, false);
    // 20 turns × (8 prompt + 192 generated) = 4,000 tokens
    demo::conversation(&mut app, &info, 20, 192, 1);
    demo::finetune(&mut app, &info, 2000, 4000);
    assert_eq!(app.tele.len(), 4000);
    let area = Rect::new(0, 0, 200, 60);
    let frames = 200;
    let mut worst_mean: f64 = 0.0;
    println!("one frame at 200x60, 4,000 tokens of telemetry, {frames} frames per view:");
    for view in View::ALL {
        app.view = view;
        let mut buf = Buffer::empty(area);
        // warm up
        for _ in 0..5 {
            blackmamba::tui::ui::draw(&app, area, &mut buf);
        }
        let mut times = Vec::with_capacity(frames);
        for _ in 0..frames {
            buf.reset();
            let t = Instant::now();
            blackmamba::tui::ui::draw(&app, area, &mut buf);
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
        times.sort_by(f64::total_cmp);
        let mean = times.iter().sum::<f64>() / times.len() as f64;
        worst_mean = worst_mean.max(mean);
        println!(
            "  {:<10} mean {mean:.3} ms  median {:.3} ms  p95 {:.3} ms",
            view.title(),
            times[times.len() / 2],
            times[times.len() * 95 / 100]
        );
    }
    println!("slowest view: {worst_mean:.3} ms per frame (target < 4 ms)");
}
