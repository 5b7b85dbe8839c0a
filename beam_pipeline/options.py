"""Every flag a user can set, with help text (`python -m beam_pipeline --help`)."""
from __future__ import annotations

from apache_beam.options.pipeline_options import PipelineOptions

RECIPES = ('hdtf',)


class TalkingFaceOptions(PipelineOptions):

  @classmethod
  def _add_argparse_args(cls, parser):
    io = parser.add_argument_group('input and output')
    io.add_argument('--input', default=None,
                    help='HDTF annotation directory, manifest (.csv/.jsonl/.parquet) or glob of local/gs:// '
                    'videos. Without it the embedded demo (a generated talking clip) runs.')
    io.add_argument('--input_format', default='auto', choices=('auto', 'hdtf', 'manifest', 'glob'),
                    help='How to read --input; auto decides from its name.')
    io.add_argument('--output', default=None,
                    help='Output directory, local or gs://. Default for the demo: ./demo_out.')
    io.add_argument('--work_dir', default=None,
                    help='Where downloads and rendered clips are cached (local or gs://). Default: <output>/_work.')
    io.add_argument('--recipe', default='hdtf', choices=RECIPES, help='Which dataset pipeline to reproduce.')
    io.add_argument('--model_dir', default=None,
                    help='Directory holding the model files; stands in for their download '
                    '(also $BEAM_PIPELINE_MODEL_DIR).')

    dl = parser.add_argument_group('download')
    dl.add_argument('--download_height', type=int, default=1080,
                    help='Wanted video height when the input gives none (HDTF resolution file wins).')
    dl.add_argument('--download_method', default='auto', choices=('auto', 'http', 'ytdlp'),
                    help='auto: direct http(s) for media file URLs, yt-dlp for web pages.')
    dl.add_argument('--full_downloads', action='store_true',
                    help='With yt-dlp, fetch whole videos instead of only the annotated time ranges.')
    dl.add_argument('--max_download_mb', type=float, default=4096, help='Size limit per download, in MiB.')
    dl.add_argument('--download_timeout_s', type=float, default=1800, help='Time limit per download, in seconds.')
    dl.add_argument('--download_retries', type=int, default=3,
                    help='Retries (exponential backoff) for transient download failures.')

    clip = parser.add_argument_group('clips')
    clip.add_argument('--fps', type=float, default=25.0, help='Output frame rate.')
    clip.add_argument('--size', type=int, default=512, help='Output width and height in pixels.')
    clip.add_argument('--crf', type=int, default=18, help='H.264 constant rate factor of the output mp4.')
    clip.add_argument('--x264_preset', default='veryfast', help='x264 speed/size preset of the output mp4.')
    clip.add_argument('--crop_mode', default='auto', choices=('auto', 'fixed', 'detect'),
                      help='auto: the given window where there is one, else detect the face; fixed: given '
                      'window or the full frame; detect: always detect.')
    clip.add_argument('--crop_scale', type=float, default=1.8,
                      help='Enlargement of the union of detected face boxes when no crop_ratio is given.')
    clip.add_argument('--detect_fps', type=float, default=5.0,
                      help='Source frames per second sampled for the auto-crop face detection.')
    clip.add_argument('--allow_silent', action='store_true', help='Keep clips whose source has no audio.')
    clip.add_argument('--min_duration', type=float, default=1.0, help='Shorter clips are rejected (seconds).')
    clip.add_argument('--max_duration_s', type=float, default=0.0,
                      help='Longer clips are rejected (seconds); 0 means no limit.')
    clip.add_argument('--max_render_s', type=float, default=1800.0,
                      help='Time limit for decoding and encoding one clip, in seconds.')

    out = parser.add_argument_group('shards')
    out.add_argument('--shard_max_samples', type=int, default=100, help='Most samples in one tar shard.')
    out.add_argument('--shard_max_mb', type=float, default=1024, help='Largest tar shard, in MiB.')
    out.add_argument('--landmark_batch_size', type=int, default=32,
                     help='Largest batch of frames handed to the face landmarker at once.')
