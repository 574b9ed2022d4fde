//! Tokenizers: HF `tokenizer.json` files (those rebuilt from GGUF metadata come from
//! `formats::gguf_tokenizer` as the same kind of document, so what Shears runs is exactly what it
//! writes next to an imported model), chat templates with their limits, and the corpus encoder
//! that tokenizes long texts in verified pieces.

use std::path::Path;

use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// Instructions a chat template may run: a base budget plus a share per message.
const TEMPLATE_FUEL_BASE: u64 = 1_000_000;
const TEMPLATE_FUEL_PER_MESSAGE: u64 = 100_000;
/// Bytes of template output allowed beyond four times the messages' own text.
const TEMPLATE_OUTPUT_BASE: usize = 1 << 20;

/// Collects a template's output and refuses to grow past `limit` bytes.
struct BoundedOutput {
    buf: Vec<u8>,
    limit: usize,
}

impl std::io::Write for BoundedOutput {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        if self.buf.len() + b.len() > self.limit {
            return Err(std::io::Error::other("output limit reached"));
        }
        self.buf.extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// One chat message for a chat template.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

/// A tokenizer with the settings around it (special tokens, chat template) that HF keeps in
/// `tokenizer_config.json`.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// The `tokenizer.json` document `inner` was built from.
    json: String,
    /// `tokenizer_config.json` (at least bos/eos tokens and the chat template when known).
    pub config: Map<String, Value>,
    /// Things a user should know about how the tokenizer was built.
    pub warnings: Vec<String>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab", &self.inner.get_vocab_size(true))
            .finish()
    }
}

impl Tokenizer {
    /// Build from a `tokenizer.json` document and a `tokenizer_config.json` map. `origin` names
    /// the file for errors.
    pub fn from_json(json: String, config: Map<String, Value>, origin: &Path) -> Result<Self> {
        let mut inner = tokenizers::Tokenizer::from_bytes(json.as_bytes())
            .map_err(|e| Error::format(origin, format!("invalid tokenizer: {e}")))?;
        // Saved after a call with truncation=True or padding, a tokenizer.json would cut every
        // document (or piece of one) and pad batches with pad ids: Shears always tokenizes whole
        // texts, so both are switched off.
        let mut warnings = vec![];
        if inner.get_truncation().is_some() {
            inner
                .with_truncation(None)
                .map_err(|e| Error::format(origin, format!("invalid tokenizer: {e}")))?;
            warnings.push(format!(
                "{}: its truncation setting is ignored (texts are tokenized whole)",
                origin.display()
            ));
        }
        if inner.get_padding().is_some() {
            inner.with_padding(None);
            warnings.push(format!(
                "{}: its padding setting is ignored",
                origin.display()
            ));
        }
        Ok(Tokenizer {
            inner,
            json,
            config,
            warnings,
        })
    }

    /// Load `tokenizer.json`, and `tokenizer_config.json` / `chat_template.jinja` when present,
    /// from an HF model directory.
    pub fn from_hf_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let tj = dir.join("tokenizer.json");
        let json = crate::fsutil::read_text(&tj, crate::fsutil::TEXT_FILE_BYTES)?;
        serde_json::from_str::<Value>(&json)
            .map_err(|e| Error::format(&tj, format!("tokenizer.json does not parse: {e}")))?;
        let tc = dir.join("tokenizer_config.json");
        let mut config = if tc.exists() {
            let text = crate::fsutil::read_text(&tc, crate::fsutil::SETTINGS_FILE_BYTES)?;
            match serde_json::from_str::<Value>(&text) {
                Ok(Value::Object(m)) => m,
                Ok(_) => {
                    return Err(Error::format(
                        &tc,
                        "tokenizer_config.json is not a JSON object",
                    ))
                }
                Err(e) => {
                    return Err(Error::format(
                        &tc,
                        format!("tokenizer_config.json does not parse: {e}"),
                    ))
                }
            }
        } else {
            Map::new()
        };
        let jinja = dir.join("chat_template.jinja");
        if !config.contains_key("chat_template") && jinja.exists() {
            let t = crate::fsutil::read_text(&jinja, crate::fsutil::SETTINGS_FILE_BYTES)?;
            config.insert("chat_template".into(), Value::String(t));
        }
        Self::from_json(json, config, &tj)
    }

    /// The underlying HF tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The largest id the tokenizer can produce: over its vocabulary and its added tokens,
    /// whose ids may sit far above [`Tokenizer::vocab_size`] (a sparse added-token table).
    pub fn max_id(&self) -> u32 {
        self.inner
            .get_vocab(true)
            .values()
            .copied()
            .max()
            .unwrap_or(0)
    }

    /// An upper bound on the input bytes one token stands for: the longest token string, in
    /// bytes (a byte-level BPE's `Ġ` or a SentencePiece `<0x0A>` take more bytes than the one
    /// byte they stand for, so this over-estimates). At least 1.
    pub fn longest_token_bytes(&self) -> usize {
        self.inner
            .get_vocab(true)
            .keys()
            .map(String::len)
            .max()
            .unwrap_or(1)
            .max(1)
    }

    /// Encode `text`. With `add_special_tokens`, the tokenizer's post-processor adds what the
    /// model expects by default (BOS for Llama-2, nothing for SmolLM2).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| Error::invalid(format!("tokenization failed: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// An encoder for corpus text: special-token strings inside a text (say a literal
    /// `<|endoftext|>` in a web page) are tokenized as text, never as control tokens, and
    /// nothing is added around it.
    ///
    /// Texts longer than [`PIECE_BYTES`] are encoded in pieces cut at spaces between words (see
    /// [`PlainTextEncoder::encode_batch`]), so a huge one-line document costs memory in
    /// proportion to a piece, not to the tokenizer's working set for the whole document.
    pub fn plain_text_encoder(&self) -> PlainTextEncoder {
        let mut inner = self.inner.clone();
        inner.set_encode_special_tokens(true);
        let mut enc = PlainTextEncoder {
            inner,
            continuation: None,
        };
        enc.continuation = enc.probe_continuation();
        enc
    }

    /// The `tokenizer.json` document.
    pub fn json(&self) -> &str {
        &self.json
    }

    /// The id the tokenizer puts before a text by default (BOS for Llama-2, none for SmolLM2).
    pub fn default_prefix_token(&self) -> Option<u32> {
        let with = self.encode("a", true).ok()?;
        let without = self.encode("a", false).ok()?;
        (with.len() > without.len() && with.ends_with(&without)).then(|| with[0])
    }

    /// Decode ids to text.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| Error::invalid(format!("decoding failed: {e}")))
    }

    /// The string of one token id.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The id of a token string.
    pub fn token_to_id(&self, tok: &str) -> Option<u32> {
        self.inner.token_to_id(tok)
    }

    fn config_token(&self, key: &str) -> Option<String> {
        match self.config.get(key)? {
            Value::String(s) => Some(s.clone()),
            Value::Object(o) => o
                .get("content")
                .and_then(|c| c.as_str())
                .map(str::to_string),
            _ => None,
        }
    }

    /// The end-of-sequence token string, if configured.
    pub fn eos_token(&self) -> Option<String> {
        self.config_token("eos_token")
    }

    /// The chat template, if the model has one.
    pub fn chat_template(&self) -> Option<&str> {
        match self.config.get("chat_template")? {
            Value::String(s) => Some(s),
            // A list of named templates: take the default one.
            Value::Array(list) => list.iter().find_map(|t| {
                (t.get("name")?.as_str()? == "default").then(|| t.get("template")?.as_str())?
            }),
            _ => None,
        }
    }

    /// Render the chat template the way HF's `apply_chat_template` does (jinja with
    /// trim_blocks and lstrip_blocks), ready to be encoded without added special tokens.
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        self.chat()?.render(messages, add_generation_prompt)
    }

    /// The chat template with the special-token strings it may use, ready to render here or in
    /// a memory-limited process (`shears generate --chat` does the latter).
    pub fn chat(&self) -> Result<ChatTemplate> {
        let template = self
            .chat_template()
            .ok_or_else(|| Error::invalid("this model's tokenizer has no chat template"))?;
        Ok(ChatTemplate {
            template: template.to_string(),
            bos_token: self.config_token("bos_token").unwrap_or_default(),
            eos_token: self.config_token("eos_token").unwrap_or_default(),
        })
    }
}

/// A chat template and the special-token strings it may use.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ChatTemplate {
    pub template: String,
    pub bos_token: String,
    pub eos_token: String,
}

impl ChatTemplate {
    /// Render the way HF's `apply_chat_template` does (jinja with trim_blocks and
    /// lstrip_blocks), with an instruction budget, an output cap and a recursion limit.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let template = self.template.as_str();
        let mut env = minijinja::Environment::new();
        // Limits: an instruction budget (loops, recursion) and an output cap, both far above
        // what a real template needs for these messages (a few hundred instructions and a few
        // hundred bytes of markup per message), so a hostile template fails instead of running
        // for hours or filling memory. minijinja itself caps a repeated string at 100 MB and
        // recursion at 500 levels.
        let content: usize = messages
            .iter()
            .map(|m| m.content.len() + m.role.len())
            .sum();
        let fuel = TEMPLATE_FUEL_BASE + TEMPLATE_FUEL_PER_MESSAGE * messages.len() as u64;
        let max_output = TEMPLATE_OUTPUT_BASE + 4 * content;
        env.set_fuel(Some(fuel));
        env.set_recursion_limit(100);
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_function("strftime_now", |fmt: String| -> String {
            // Templates use this for "today's date"; a fixed date keeps prompts reproducible.
            fmt.replace("%d", "26")
                .replace("%b", "Jul")
                .replace("%B", "July")
                .replace("%Y", "2024")
        });
        env.add_template("chat", template)
            .map_err(|e| Error::invalid(format!("chat template does not parse: {e}")))?;
        let ctx = minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.as_str(),
            eos_token => self.eos_token.as_str(),
        };
        let mut out = BoundedOutput {
            buf: Vec::new(),
            limit: max_output,
        };
        env.get_template("chat")
            .and_then(|t| t.render_captured_to(ctx, &mut out).map(|_| ()))
            .map_err(|e| {
                let why = match e.kind() {
                    minijinja::ErrorKind::OutOfFuel => format!(
                        "it ran past its budget of {fuel} instructions (a loop that never ends, or one far too long)"
                    ),
                    minijinja::ErrorKind::WriteFailure => format!(
                        "its output grew past {max_output} bytes for {} bytes of messages",
                        content
                    ),
                    _ => e.to_string(),
                };
                Error::invalid(format!("chat template failed: {why}"))
            })?;
        String::from_utf8(out.buf)
            .map_err(|_| Error::invalid("chat template produced invalid UTF-8"))
    }
}

impl Tokenizer {
    /// Write `tokenizer.json`, `tokenizer_config.json` and `special_tokens_map.json` into `dir`.
    pub fn save(&self, dir: impl AsRef<Path>) -> Result<()> {
        let dir = dir.as_ref();
        let write =
            |name: &str, bytes: &[u8]| crate::fsutil::write_atomic(&dir.join(name), bytes, false);
        write("tokenizer.json", self.json.as_bytes())?;
        let text = serde_json::to_string_pretty(&Value::Object(self.config.clone())).expect("json");
        write("tokenizer_config.json", text.as_bytes())?;
        let mut map = Map::new();
        for k in ["bos_token", "eos_token", "unk_token", "pad_token"] {
            if let Some(t) = self.config_token(k) {
                map.insert(k.into(), t.into());
            }
        }
        let text = serde_json::to_string_pretty(&Value::Object(map)).expect("json");
        write("special_tokens_map.json", text.as_bytes())
    }
}

/// Texts longer than this are tokenized in pieces of about this size.
pub const PIECE_BYTES: usize = 32 << 10;
/// The most text tokenized in one piece when no cut point is found (the tokenizer's working
/// set is about a hundred times the text).
pub const WHOLE_BYTES: usize = 4 << 20;
/// How far past a piece's nominal end a cut point (a space between two word characters whose
/// tokens agree across the cut) is looked for before the text is refused.
const CUT_SEARCH_BYTES: usize = 64 << 10;
/// Bytes on each side of a cut that are re-tokenized whole to confirm the cut changes nothing.
const CUT_CHECK_BYTES: usize = 256;
/// Candidate cut points checked per cut, of each kind, before a text is refused.
const CUT_TRIES: usize = 64;
/// Pieces tokenized at once (in parallel).
const PIECES_IN_FLIGHT: usize = 32;

/// How a piece that starts at a cut (with the space before its first word) is tokenized so that
/// its ids are exactly the ids that text has inside the whole document.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Continuation {
    /// Encode it as it is (byte-level BPE: the space belongs to the next word's pre-token).
    AsIs,
    /// Drop the space first (SentencePiece-style normalizers prepend '▁' to every input, which
    /// then stands for the space).
    DropSpace,
}

/// See [`Tokenizer::plain_text_encoder`].
pub struct PlainTextEncoder {
    inner: tokenizers::Tokenizer,
    /// `None` when no rule reproduces the whole-text ids (long texts are then refused).
    continuation: Option<Continuation>,
}

impl PlainTextEncoder {
    fn encode_many(&self, texts: Vec<&str>) -> Result<Vec<Vec<u32>>> {
        let encodings = self
            .inner
            .encode_batch_fast(texts, false)
            .map_err(|e| Error::invalid(format!("tokenization failed: {e}")))?;
        Ok(encodings
            .into_iter()
            .map(|e| e.get_ids().to_vec())
            .collect())
    }

    fn encode_one(&self, text: &str) -> Result<Vec<u32>> {
        let e = self
            .inner
            .encode_fast(text, false)
            .map_err(|e| Error::invalid(format!("tokenization failed: {e}")))?;
        Ok(e.get_ids().to_vec())
    }

    /// The text a piece starting at a cut is encoded as.
    fn piece<'a>(&self, text: &'a str, at_cut: bool) -> &'a str {
        match (at_cut, self.continuation) {
            (true, Some(Continuation::DropSpace)) if text.starts_with(' ') => &text[1..],
            _ => text,
        }
    }

    /// Find the rule under which "hello world" cut before the space tokenizes like the whole.
    fn probe_continuation(&self) -> Option<Continuation> {
        let whole = self.encode_one("hello world").ok()?;
        let head = self.encode_one("hello").ok()?;
        [Continuation::AsIs, Continuation::DropSpace]
            .into_iter()
            .find(|&rule| {
                let tail = match rule {
                    Continuation::AsIs => " world",
                    Continuation::DropSpace => "world",
                };
                self.encode_one(tail)
                    .is_ok_and(|t| [head.as_slice(), &t].concat() == whole)
            })
    }

    /// Whether cutting `text` at byte `cut` (a space) leaves the ids of the bytes around it
    /// unchanged: the [`CUT_CHECK_BYTES`] on each side tokenized whole and in two. (Both
    /// versions start and end at the same bytes, so only the cut can make them differ.)
    fn cut_agrees(&self, text: &str, cut: usize) -> Result<bool> {
        let mut start = cut.saturating_sub(CUT_CHECK_BYTES);
        while !text.is_char_boundary(start) {
            start -= 1;
        }
        let mut end = (cut + CUT_CHECK_BYTES).min(text.len());
        while !text.is_char_boundary(end) {
            end += 1;
        }
        let whole = self.encode_one(&text[start..end])?;
        let left = self.encode_one(&text[start..cut])?;
        let right = self.encode_one(self.piece(&text[cut..end], true))?;
        Ok([left, right].concat() == whole)
    }

    /// Cut points of a long text: near every [`PIECE_BYTES`], a space between two words (or a
    /// change between letters, digits and punctuation) at which tokenizing in two changes
    /// nothing nearby.
    fn cuts(&self, text: &str) -> Result<Vec<usize>> {
        let b = text.as_bytes();
        let mut cuts = vec![];
        let mut from = 0;
        while b.len() - from > PIECE_BYTES {
            let lo = from + PIECE_BYTES;
            let hi = (lo + CUT_SEARCH_BYTES).min(b.len());
            // Spaces between words first; then, for text without them (CJK, code), places
            // where letters meet digits or punctuation. Each candidate must pass the check.
            let mut found = None;
            let candidates = (lo..hi).filter(|&i| is_cut(text, i)).take(CUT_TRIES).chain(
                (lo..hi)
                    .filter(|&i| text.is_char_boundary(i) && kinds_differ(text, i))
                    .take(CUT_TRIES),
            );
            for i in candidates {
                if self.cut_agrees(text, i)? {
                    found = Some(i);
                    break;
                }
            }
            match found {
                Some(i) => {
                    cuts.push(i);
                    from = i;
                }
                // No checked cut nearby: the rest is tokenized whole if it is not huge (text
                // without spaces, such as CJK under a SentencePiece tokenizer).
                None if b.len() - from <= WHOLE_BYTES => break,
                None => {
                    return Err(Error::invalid(format!(
                        "a text of {} bytes has no place to split it between bytes {lo} and {hi} (a space between two words, or a change between letters, digits and punctuation, where the tokenizer's ids do not change), and more than {WHOLE_BYTES} bytes remain; Shears tokenizes long texts in pieces to bound memory; split the document into smaller ones",
                        b.len()
                    )))
                }
            }
        }
        Ok(cuts)
    }

    /// The ids of a text longer than [`PIECE_BYTES`], piece by piece.
    fn encode_long(&self, text: &str) -> Result<Vec<u32>> {
        if self.continuation.is_none() {
            return Err(Error::invalid(format!(
                "a text of {} bytes is longer than {PIECE_BYTES} bytes, and this tokenizer cannot be applied piece by piece with the same result; split the document into smaller ones",
                text.len()
            )));
        }
        let cuts = self.cuts(text)?;
        let bounds: Vec<(usize, usize)> = std::iter::once(0)
            .chain(cuts.iter().copied())
            .zip(cuts.iter().copied().chain(std::iter::once(text.len())))
            .collect();
        let mut ids = Vec::new();
        for group in bounds.chunks(PIECES_IN_FLIGHT) {
            let pieces: Vec<&str> = group
                .iter()
                .map(|&(a, b)| self.piece(&text[a..b], a > 0))
                .collect();
            for p in self.encode_many(pieces)? {
                ids.extend(p);
            }
        }
        Ok(ids)
    }

    /// Encode many texts in parallel (all cores). Texts longer than [`PIECE_BYTES`] are cut at
    /// spaces between words into pieces of about that size; each cut is checked by tokenizing
    /// the few hundred bytes around it whole, so the ids are those of the whole text.
    pub fn encode_batch(&self, texts: &[&str]) -> Result<Vec<Vec<u32>>> {
        let short: Vec<&str> = texts
            .iter()
            .copied()
            .filter(|t| t.len() <= PIECE_BYTES)
            .collect();
        let mut short = self.encode_many(short)?.into_iter();
        texts
            .iter()
            .map(|t| {
                if t.len() <= PIECE_BYTES {
                    Ok(short.next().expect("one encoding per short text"))
                } else {
                    self.encode_long(t)
                }
            })
            .collect()
    }
}

/// Whether the characters on both sides of byte `i` (a char boundary) are of different kinds
/// among letter, digit and punctuation (whitespace excluded): where byte-level pre-tokenizers
/// split text that has no spaces.
fn kinds_differ(text: &str, i: usize) -> bool {
    let kind = |c: char| {
        if c.is_alphabetic() {
            Some(0)
        } else if c.is_numeric() {
            Some(1)
        } else if c.is_whitespace() {
            None
        } else {
            Some(2)
        }
    };
    match (text[..i].chars().next_back(), text[i..].chars().next()) {
        (Some(a), Some(b)) => matches!((kind(a), kind(b)), (Some(x), Some(y)) if x != y),
        _ => false,
    }
}

/// Byte `i` of `text` is a space between two letters or digits (any script).
fn is_cut(text: &str, i: usize) -> bool {
    let b = text.as_bytes();
    i > 0
        && i + 1 < b.len()
        && b[i] == b' '
        && text[..i]
            .chars()
            .next_back()
            .is_some_and(char::is_alphanumeric)
        && text[i + 1..]
            .chars()
            .next()
            .is_some_and(char::is_alphanumeric)
}
