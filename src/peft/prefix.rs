//! What to say when an adapter's module paths do not name the base model's tensors: usually a
//! missing or wrong base prefix (an adapter trained on `BertForSequenceClassification` has paths
//! `bert.encoder…`; a `BertModel` checkpoint names them `encoder…`).

/// A hint for an adapted module `path` whose weight `<prefix><path>.weight` is not among
/// `base_names` (the tensor names the base has, or the model asked for): the prefix that would
/// make it match, or the leading segments the adapter has and the base lacks, with an example
/// name. Empty when nothing in the base resembles the module.
///
/// ```
/// use fourierft::peft::prefix_hint;
/// let base = ["model.layers.0.self_attn.q_proj.weight", "lm_head.weight"];
/// let hint = prefix_hint("layers.0.self_attn.q_proj", "", base.iter().copied());
/// assert!(hint.contains(r#"base prefix "model.""#), "{hint}");
/// let base = ["encoder.layer.0.attention.self.query.weight"];
/// let hint = prefix_hint("bert.encoder.layer.0.attention.self.query", "", base.iter().copied());
/// assert!(hint.contains(r#""bert.""#), "{hint}");
/// ```
pub fn prefix_hint<'a>(
    path: &str,
    prefix: &str,
    base_names: impl Iterator<Item = &'a str>,
) -> String {
    let wanted = format!("{path}.weight");
    let mut best: Option<(usize, &str)> = None;
    for name in base_names {
        // The longest tail of `path` (on a segment boundary) that the base name ends with.
        let mut tail = wanted.as_str();
        loop {
            if name == tail || name.ends_with(&format!(".{tail}")) {
                if best.is_none_or(|(len, _)| tail.len() > len) {
                    best = Some((tail.len(), name));
                }
                break;
            }
            match tail.split_once('.') {
                Some((_, rest)) if rest.contains('.') => tail = rest,
                _ => break,
            }
        }
    }
    let Some((len, name)) = best else {
        return String::new();
    };
    let tail = &wanted[wanted.len() - len..];
    let head = &wanted[..wanted.len() - len];
    let base_head = &name[..name.len() - len];
    if head.is_empty() {
        format!("; the base has {name:?}: use base prefix {base_head:?} (given {prefix:?})")
    } else if base_head.is_empty() || base_head == prefix {
        format!(
            "; the base has {name:?} for {tail:?}: the adapter's module paths start with {head:?}, \
             which this base lacks (it was trained on a model that wraps this one, e.g. a \
             *ForSequenceClassification around the encoder): merge into that model's checkpoint"
        )
    } else {
        format!(
            "; the base has {name:?}: the adapter's module paths start with {head:?} where the \
             base has {base_head:?}"
        )
    }
}
