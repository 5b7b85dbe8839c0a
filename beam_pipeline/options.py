"""Every flag a user can set, with help text (`python -m beam_pipeline --help`)."""
from __future__ import annotations

from apache_beam.options.pipeline_options import PipelineOptions

RECIPES = ('hdtf',)


class TalkingFaceOptions(PipelineOptions):

  @classmethod
  def _add_argparse_args(cls, parser):
    io = parser.add_argument_group('input and output')
    io.add_argument('--input', default=None,
                    help='HDTF annotation directory, manifest (.csv/.jsonl/.parquet), tar/zip of videos or glob '
                    'of local/gs:// videos. Without it the embedded demo (a generated talking clip) runs.')
    io.add_argument('--input_format', default='auto', choices=('auto', 'hdtf', 'manifest', 'glob', 'archive'),
                    help='How to read --input; auto decides from its name.')
    io.add_argument('--output', default=None,
                    help='Output directory, local or gs://. Default for the demo: ./demo_out.')
    io.add_argument('--work_dir', default=None,
                    help='Where downloads and rendered clips are cached (local or gs://). Default: <output>/_work.')
    io.add_argument('--recipe', default='hdtf', choices=RECIPES, help='Which dataset pipeline to reproduce.')
    io.add_argument('--run_id', default=None,
                    help='Names this run\'s temporary files and crash markers in the work dir and output. Set by the '
                    'CLI and the flex-template launcher (UTC time + random suffix); give one only to re-attach to a '
                    'run on purpose.')
    io.add_argument('--model_dir', default=None,
                    help='Directory holding the model files; stands in for their download '
                    '(also $BEAM_PIPELINE_MODEL_DIR).')
    io.add_argument('--incremental', action='store_true',
                    help='For scheduled reruns over a growing input: besides the clips already in the output '
                    '(always skipped), also skip clips the last run rejected for a permanent reason (no face, '
                    'too short, corrupt media...; their rejects are carried over). Transient failures are retried.')

    dl = parser.add_argument_group('download')
    dl.add_argument('--download_height', type=int, default=1080,
                    help='Wanted video height when the input gives none (HDTF resolution file wins).')
    dl.add_argument('--download_method', default='auto', choices=('auto', 'http', 'ytdlp'),
                    help='auto: direct http(s) for media file URLs, yt-dlp for web pages.')
    dl.add_argument('--full_downloads', action='store_true',
                    help='With yt-dlp, fetch whole videos instead of only the annotated time ranges.')
    dl.add_argument('--max_download_mb', type=float, default=4096,
                    help='Size limit per download, in MiB (yt-dlp section and HLS downloads included: the child is '
                    'killed once its output grows past it).')
    dl.add_argument('--download_timeout_s', type=float, default=1800,
                    help='Time limit for the whole download of one source, in seconds: every retry, yt-dlp\'s '
                    'metadata pass and every section included (time queued for a download slot is not).')
    dl.add_argument('--download_retries', type=int, default=3,
                    help='Retries (exponential backoff, or the server\'s Retry-After on 429/503) for transient '
                    'download failures.')
    dl.add_argument('--max_concurrent_downloads', type=int, default=16,
                    help='Downloads (network attempts) one worker process runs at once; a source waiting out a '
                    'retry back-off holds none.')
    dl.add_argument('--max_downloads_per_host', type=int, default=4,
                    help='Of those, at most this many to one host (host:port) at once.')
    dl.add_argument('--cookies', default=None,
                    help='Netscape-format cookies file handed to yt-dlp (--cookies), e.g. for YouTube\'s sign-in '
                    'checks; on remote runners a gs:// path. Each yt-dlp run gets its own copy; the file is never '
                    'written.')
    dl.add_argument('--proxy', default=None,
                    help='Proxy URL for yt-dlp (--proxy) and direct http(s) downloads; without it the environment\'s '
                    'proxy variables apply.')

    clip = parser.add_argument_group('clips')
    clip.add_argument('--fps', type=float, default=25.0, help='Output frame rate.')
    clip.add_argument('--size', type=int, default=512, help='Output width and height in pixels.')
    clip.add_argument('--crf', type=int, default=18, help='H.264 constant rate factor of the output mp4.')
    clip.add_argument('--x264_preset', default='veryfast', help='x264 speed/size preset of the output mp4.')
    clip.add_argument('--crop_mode', default='auto', choices=('auto', 'fixed', 'detect'),
                      help='auto: the given window where there is one, else detect the face; fixed: given '
                      'window or the full frame (letterboxed to square); detect: always detect. A given window is '
                      'made square and shifted into the frame; only what cannot fit is padded black.')
    clip.add_argument('--crop_scale', type=float, default=1.8,
                      help='Enlargement of the union of detected face boxes when no crop_ratio is given.')
    clip.add_argument('--detect_fps', type=float, default=5.0,
                      help='Source frames per second sampled for the auto-crop face detection.')
    clip.add_argument('--allow_silent', action='store_true', help='Keep clips whose source has no audio.')
    clip.add_argument('--min_duration', type=float, default=1.0,
                      help='Shorter clips are rejected (seconds), as are shorter pieces of a clip split by face '
                      'tracking (too_short).')
    clip.add_argument('--max_duration_s', type=float, default=0.0,
                      help='Longer clips are rejected (seconds); 0 means no limit.')
    clip.add_argument('--max_clip_s', type=float, default=300.0,
                      help='Longer clips (whole videos from a glob or a manifest row without clips) are cut into '
                      'consecutive pieces of equal length, at most this many seconds each, named <clip>_s<start '
                      'in ms>, so one clip\'s frames and audio stay bounded on a worker; 0 means no cutting.')
    clip.add_argument('--max_render_s', type=float, default=1800.0,
                      help='Time limit for decoding and encoding one clip, in seconds.')

    out = parser.add_argument_group('shards')
    out.add_argument('--shard_max_samples', type=int, default=100, help='Most samples in one tar shard.')
    out.add_argument('--shard_max_mb', type=float, default=1024, help='Largest tar shard, in MiB.')
    out.add_argument('--shard_writers', type=int, default=1,
                     help='Samples are batched into shards under this many keys: this many shards fill at once and '
                     'a run ends with at most this many partly filled shards. Batching only collects small '
                     'references; the shards themselves are written in parallel on any worker.')
    out.add_argument('--stale_after_h', type=float, default=24.0,
                     help='At start, unfinished shard files (a shard index without its tar, *.partial) older than this '
                     'many hours are removed; younger ones may belong to a job still writing to the same output.')
    out.add_argument('--landmark_batch_size', type=int, default=32,
                     help='Largest batch of frames handed to the face landmarker at once.')

    safe = parser.add_argument_group('limits and security')
    safe.add_argument('--max_pixels', type=int, default=4096 * 4096,
                      help='Sources whose frames have more pixels are rejected (too_many_pixels) before any '
                      'frame is decoded; 0 means no limit.')
    safe.add_argument('--probe_timeout_s', type=float, default=60.0,
                      help='Time limit for probing one source (opening it and decoding its first frame).')
    safe.add_argument('--allowed_schemes', default='http,https,gs,file',
                      help='Comma-separated URL schemes inputs may use; plain paths count as file.')
    safe.add_argument('--allow_private_hosts', action='store_true',
                      help='Let http(s) and yt-dlp URLs reach loopback, private (RFC 1918, CGNAT, IPv6 ULA) and '
                      'link-local hosts. Off: refused as host_not_allowed. Cloud metadata addresses stay refused.')
    safe.add_argument('--allowed_buckets', default='',
                      help='Comma-separated gs:// buckets inputs (videos, manifest URLs, archives) may read, or * for '
                      'any; others are refused as bucket_not_allowed. Default: the buckets of --output and --input. '
                      'The work dir\'s bucket is always readable.')
    safe.add_argument('--allowed_roots', default='',
                      help='Comma-separated directories that local and file:// inputs (videos and archives) must '
                      'resolve into, symlinks followed; empty allows any local path. Set it for untrusted manifests.')
    safe.add_argument('--max_archive_mb', type=float, default=65536,
                      help='Most MiB unpacked from one input archive (sum of its member videos, in archive order); '
                      'members past it are rejected as too_large. Each member is also bounded by --max_download_mb.')
    safe.add_argument('--trust_pickle', action='store_true',
                      help='Load <stem>.pkl metadata members of input archives. Off: pickles are never loaded '
                      '(they run code) and are rejected as pickle_refused.')

    seen = parser.add_argument_group('progress and report')
    seen.add_argument('--no_progress', action='store_true',
                      help='Do not print the progress line (sources downloaded, clips done and rejected, rate, '
                      'ETA): live on DirectRunner, from the job\'s Beam metrics every 30 s on remote runners.')
    seen.add_argument('--no_report', action='store_true',
                      help='Do not write report.html (rejects by reason with thumbnails and measured values, kept '
                      'samples as videos, score plots against the thresholds, a sortable clip table) into the '
                      'output at the end; `python -m beam_pipeline.report OUTPUT` writes it later.')
    seen.add_argument('--report_samples', type=int, default=16,
                      help='How many kept samples report.html shows in its contact sheet (the first 4 also as '
                      'videos with landmarks drawn).')

    faces = parser.add_argument_group('face tracking and quality filters')
    faces.add_argument('--multi_face', default='largest', choices=('largest', 'split', 'reject'),
                       help='Several faces on screen: keep only the dominant face track (size x time on screen), '
                       'make each track its own '
                       'clip (<clip>_f<start in ms>), or reject the clip (multiple_faces).')
    faces.add_argument('--max_gap', type=int, default=12,
                       help='A face missing for more output frames than this ends its track; the clip is split '
                       'there (pieces shorter than --min_duration are rejected as too_short).')
    faces.add_argument('--shot_threshold', type=float, default=0.4,
                       help='Hard shot change: Bhattacharyya distance between consecutive frames\' HSV histograms '
                       'above this splits the clip; 0 turns shot detection off.')
    faces.add_argument('--crop_follow', type=float, default=0.0,
                       help='0: one fixed crop window per face track (HDTF). > 0: the window follows the face, its '
                       'path smoothed with a Gaussian of this many seconds.')
    faces.add_argument('--min_face_px', type=float, default=64.0,
                       help='Reject (face_too_small) clips whose median face size in source pixels is below this.')
    faces.add_argument('--min_face_ratio', type=float, default=0.8,
                       help='Reject (face_ratio_low) clips with a face on fewer output frames than this fraction.')
    faces.add_argument('--min_resolution', type=int, default=0,
                       help='Reject (low_resolution) clips whose source\'s shorter side has fewer pixels; 0: off.')
    faces.add_argument('--min_sharpness', type=float, default=25.0,
                       help='Reject (blurry) clips whose median variance of the Laplacian over the face box is '
                       'below this, measured at the face\'s source scale (a crop scaled up from a small source '
                       'face is scaled back down to its source pixels first).')
    faces.add_argument('--max_yaw', type=float, default=45.0,
                       help='Reject (yaw_too_large) clips whose head yaw exceeds this many degrees (5-frame median).')
    faces.add_argument('--max_pitch', type=float, default=30.0,
                       help='Reject (pitch_too_large) clips whose head pitch exceeds this many degrees.')
    faces.add_argument('--eye_motion', action='store_true',
                       help='MegActor\'s eye-motion filter: reject (eye_motion_low) clips whose iris gaze angle '
                       '(max filter 3, 32 frames every 10) varies no more than --min_eye_motion_var.')
    faces.add_argument('--min_eye_motion_var', type=float, default=2.0,
                       help='Eye-motion variance threshold in degrees squared (with --eye_motion).')
    faces.add_argument('--min_sync_corr', type=float, default=0.3,
                       help='Reject (av_sync_low) clips whose best correlation between mouth opening and audio '
                       'loudness is below this (silent clips are not judged). Unrelated audio reaches ~0.3-0.4 '
                       'on 4 s clips by chance, speech in sync ~0.6-0.85: raise it for long clips.')
    faces.add_argument('--max_sync_lag', type=int, default=0,
                       help='Reject (av_sync_offset) clips whose best audio lag exceeds this many frames; 0: off.')
    faces.add_argument('--sync_search', type=int, default=15,
                       help='Audio lags searched for the sync score, in output frames either way.')
    faces.add_argument('--score_only', action='store_true',
                       help='Compute and write every score but reject on none of them (the filters a clip fails are '
                       'listed in its json under `failed`). Clips with no face and too-short pieces still have no '
                       'sample to write and stay rejected.')
