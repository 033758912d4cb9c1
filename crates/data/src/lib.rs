//! reel-data: everything between text on disk and a `[B, T]` batch of token ids.
//!
//! - [`Tokenizer`] wraps a Hugging Face `tokenizer.json` (the `tokenizers` crate) together with the
//!   `tokenizer_config.json` fields that matter for chat: the template and the special tokens.
//! - [`ChatTemplate`] renders a Jinja chat template with minijinja the way `transformers` does.
//! - [`sft`] reads SFT JSONL and turns a conversation into `input_ids` plus a loss mask that
//!   covers exactly the assistant turns.
//! - [`batch`] pads examples into a [`Batch`] (`[B, T]` ids, shifted targets, positions) and
//!   groups examples of similar length under a token budget with a resumable [`BucketSampler`].
//! - [`synth`] generates the small demo tasks (reverse, sort, add) and a character tokenizer.
//! - [`video`] decodes videos (Motion-JPEG AVI natively, frame folders, other containers through
//!   ffmpeg), samples frames and preprocesses them into Qwen2-VL's `pixel_values_videos`.
//! - [`longvideo`] reads and writes LongVideo-Reason JSONL (video questions with reasoning), its
//!   prompt template and SFT target; [`video_synth`] generates the synthetic long-video dataset.
//! - [`vl_data`]: a LongVideo-Reason record → token ids with each video's placeholder run expanded
//!   to its merged vision tokens, an assistant-only loss mask and the processed videos.

pub mod batch;
pub mod chat;
pub mod longvideo;
pub mod sft;
pub mod synth;
pub mod tokenizer;
pub mod video;
pub mod video_synth;
pub mod vl_data;

use std::path::PathBuf;

pub use batch::{make_batch, Batch, Batching, BucketSampler, SamplerState, IGNORE_INDEX};
pub use chat::{ChatTemplate, Message, SpecialTokens};
pub use longvideo::{
    is_held_out, validate_reason_file, write_reason_jsonl, ReasonFile, ReasonRecord, VideoCheck,
    REASONING_INSTRUCTION, VIDEO_PLACEHOLDER,
};
pub use sft::{
    prompt_ids, read_sft_jsonl, read_sft_jsonl_lenient, tokenize_conversation, SftFile,
    TokenizedExample,
};
pub use synth::{
    char_tokenizer, char_tokenizer_with, solve, synth_examples, write_jsonl, SynthKind, SynthTask,
};
pub use tokenizer::Tokenizer;
pub use video::{
    load_video, plan_video, video_content_hash, FrameSampling, Video, VideoError, VideoFrames,
    VideoInputs, VideoMeta, VideoPlan, VideoProcessor, VideoProcessorConfig,
};
pub use video_synth::{write_synth_dataset, SynthVideoConfig};
pub use vl_data::{
    load_vl_examples, load_vl_plans, plan_vl_record, prepare_vl_record, stream_vl_examples,
    tokenize_vl_record, VideoSettings, VlExample, VlLoadReport, VlRecordPlan, VlSkip, VlVideo,
    VlVideoPlan, VIDEO_PAD, VISION_SPECIAL_TOKENS,
};

/// Everything that can go wrong reading data. Messages name the file (and 1-based line) involved.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// Reading or writing a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file exists but its content is not what we expect (bad JSON, wrong field types, ...).
    #[error("{}: {msg}", path.display())]
    Config { path: PathBuf, msg: String },
    /// A bad line in a JSONL file.
    #[error("{}:{line}: {msg}", path.display())]
    Jsonl {
        path: PathBuf,
        line: usize,
        msg: String,
    },
    /// The `tokenizers` library refused to encode or decode.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The chat template failed to compile or render (includes `raise_exception`).
    #[error("chat template: {0}")]
    Template(String),
    /// A conversation that cannot be turned into a training example.
    #[error("conversation: {0}")]
    Conversation(String),
    /// A sampler state that does not fit the sampler it is restored into.
    #[error("sampler: {0}")]
    Sampler(String),
    /// A video that cannot be read (the message names it).
    #[error(transparent)]
    Video(#[from] video::VideoError),
}

/// Result with [`DataError`].
pub type Result<T, E = DataError> = std::result::Result<T, E>;

impl DataError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        DataError::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn config(path: impl Into<PathBuf>, msg: impl std::fmt::Display) -> Self {
        DataError::Config {
            path: path.into(),
            msg: msg.to_string(),
        }
    }
}
