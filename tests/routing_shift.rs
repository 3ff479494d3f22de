//! The routing comparison a fine-tune run saves: expert shares per MoE layer before and after,
//! their total variation distance and the share of tokens that changed expert.

#![allow(clippy::unwrap_used)]

mod ft_common;

use blackmamba::finetune::data::Example;
use blackmamba::finetune::routing_shift::{routes, RoutingShift, ROUTING_FILE};

#[test]
fn shares_distance_and_rerouted_tokens_by_hand() {
    let before = vec![(1, 2, vec![0, 0, 1, 1]), (3, 4, vec![3, 3, 3, 3])];
    let after = vec![(1, 2, vec![0, 1, 1, 1]), (3, 4, vec![3, 3, 3, 3])];
    let s = RoutingShift::compare("test", &before, &after);
    assert_eq!(s.tokens, 4);
    let l = &s.layers[0];
    assert_eq!((l.layer, l.before.clone(), l.after.clone()), (1, vec![0.5, 0.5], vec![0.25, 0.75]));
    assert!((l.moved - 0.25).abs() < 1e-12 && (l.tokens_rerouted - 0.25).abs() < 1e-12);
    assert_eq!((s.layers[1].moved, s.layers[1].tokens_rerouted), (0.0, 0.0));
    let text = s.summary();
    assert!(
        text.contains("1 25.0%, 3 0.0%") && text.contains("most in layer 1") && !text.contains('\n'),
        "{text}"
    );
    let dir = tempfile::tempdir().unwrap();
    s.save(dir.path()).unwrap();
    let back: RoutingShift = serde_json::from_str(&std::fs::read_to_string(dir.path().join(ROUTING_FILE)).unwrap()).unwrap();
    assert_eq!(back, s);
}

#[test]
fn routes_cover_every_real_token_and_batching_does_not_change_them() {
    let m = ft_common::model(&ft_common::config(&["r", "4", "r", "4"], 16), 2, true);
    let ex = |n: usize, k: u32| Example {
        ids: (0..n as u32).map(|i| (i * 7 + k) % 200 + 1).collect(),
        mask: vec![true; n],
    };
    let examples = vec![ex(9, 1), ex(4, 2), ex(13, 3)];
    let one = routes(&m, &examples, 1).unwrap();
    let all = routes(&m, &examples, 3).unwrap();
    assert_eq!(one.len(), 2, "two MoE layers");
    assert_eq!(one[0].2.len(), 8 + 3 + 12, "every input token, no padding");
    assert_eq!(one, all, "padding to the longest example does not change a token's expert");
    let same = RoutingShift::compare("x", &one, &all);
    assert!(same
        .layers
        .iter()
        .all(|l| l.moved == 0.0 && (l.before.iter().sum::<f64>() - 1.0).abs() < 1e-9));
}
