// dt = softplus(raw + dt_bias) (linear above 20), clamped to dt_limit. Included by the scan and
// the decode update, whose Params carry has_lo, has_hi, dt_lo, dt_hi and whose `heads` buffer
// starts with dt_bias.
fn dt_of(raw: f32, h: u32) -> f32 {
    let v = raw + heads[h];
    var d = v;
    if (v <= 20.0) {
        d = log(1.0 + exp(v));
    }
    if (p.has_lo != 0u) {
        d = max(d, p.dt_lo);
    }
    if (p.has_hi != 0u) {
        d = min(d, p.dt_hi);
    }
    return d;
}
