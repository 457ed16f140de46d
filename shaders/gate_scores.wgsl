// gate_scores: a token's router scores as route_tokens computed them, recomputed from the
// training forward's logits (the shader registry prepends it to gate_backward and
// gate_input_backward, which declare `logits`).

// A token's row of logits: where it starts, the largest of its routed logits and
// Σ exp(h − max) over them (the softmax's, which the z-loss needs whatever the scores),
// and whether the scores are sigmoids.
struct RowScores {
    row: u32,
    max_logit: f32,
    sum: f32,
    sigmoid: bool,
}

fn row_scores(row: u32, n: u32, sigmoid: bool) -> RowScores {
    var max_logit = logits[row];
    for (var e = 1u; e < n; e++) {
        max_logit = max(max_logit, logits[row + e]);
    }
    var sum = 0.0;
    for (var e = 0u; e < n; e++) {
        sum += exp(logits[row + e] - max_logit);
    }
    return RowScores(row, max_logit, sum, sigmoid);
}

// softmax(h)[e].
fn softmax_of(scores: RowScores, e: u32) -> f32 {
    return exp(logits[scores.row + e] - scores.max_logit) / scores.sum;
}

// The score p[e]: σ(h[e]), or softmax(h)[e].
fn score_of(scores: RowScores, e: u32) -> f32 {
    if (scores.sigmoid) {
        return 1.0 / (1.0 + exp(-logits[scores.row + e]));
    }
    return softmax_of(scores, e);
}

// log Σ exp(h) over the routed logits.
fn log_sum_exp(scores: RowScores) -> f32 {
    return scores.max_logit + log(scores.sum);
}
