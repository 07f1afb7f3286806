"""Videos through Qwen2-VL's own video path: patching equals the image processor's for a still
video, the fast path equals the recompute path with videos in mixed batches, a row embeds the
same alone and in a batch, frames come from lists, folders and video files."""
import numpy as np
import pytest
import torch

from unified_tte import TTEInput, UnifiedTTE
from unified_tte.errors import InputError
from PIL import Image

from unified_tte.model.media import Video, evenly, frame_files, load_frames, video_patches
from unified_tte.model.zoo import tiny_qwen2vl
from unified_tte.testing import randomize_adapters, solid_image

TOL = 1e-5


def frames(n, width=56, height=56, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)) for _ in range(n)]


def write_frame_folder(folder, n, **kw):
    folder.mkdir(parents=True)
    for i, im in enumerate(frames(n, **kw)):
        im.save(folder / f"frame_{i + 1}.png")   # natural order: frame_10 after frame_9
    return folder


def mixed_batch(tmp_path):
    return [TTEInput("What happens in the clip?", videos=[frames(4, seed=1)]),
            TTEInput("Which digit is shown?", [solid_image(56, 56)]),
            TTEInput("Describe the longer video in a few careful words.",
                     videos=[write_frame_folder(tmp_path / "clip", 6, width=84, seed=2)]),
            TTEInput("no media at all")]


def test_a_still_video_patches_like_the_image_it_repeats():
    bb = tiny_qwen2vl()
    proc = bb.image_processor
    size = {"shortest_edge": 28 * 28, "longest_edge": 112 * 112}
    [frame] = frames(1, width=84, height=56)
    values, grid = video_patches([frame, frame], proc, size)
    image = proc(images=[frame], return_tensors="np", size=size)
    assert grid == image["image_grid_thw"][0].tolist() == [1, 4, 6]
    np.testing.assert_array_equal(values, image["pixel_values"])


def test_temporal_pairs_keep_frame_order_and_odd_counts_repeat_the_last_frame():
    proc = tiny_qwen2vl().image_processor
    size = {"shortest_edge": 28 * 28, "longest_edge": 56 * 56}
    clip = frames(3)
    values, grid = video_patches(clip, proc, size)
    assert grid == [2, 4, 4]                                  # 3 frames -> padded to 4 -> t = 2
    p = proc.patch_size
    patches = values.reshape(2, 16, 3, 2, p, p)               # [t, h*w, C, temporal, p, p]
    single = [proc(images=[f], return_tensors="np", size=size)["pixel_values"].reshape(16, 3, 2, p, p)[:, :, 0]
              for f in clip]
    np.testing.assert_array_equal(patches[0, :, :, 0], single[0])
    np.testing.assert_array_equal(patches[0, :, :, 1], single[1])
    np.testing.assert_array_equal(patches[1, :, :, 0], single[2])
    np.testing.assert_array_equal(patches[1, :, :, 1], single[2])   # the repeated last frame


@pytest.mark.parametrize("mode", ["activated", "top_k"])
def test_fast_path_equals_recompute_with_videos_images_and_text_in_one_batch(mode, tmp_path, one_torch_thread):
    tte = UnifiedTTE(tiny_qwen2vl(), mode=mode, embed_layers=2)
    randomize_adapters(tte, std=0.15, seed=1)
    inputs = mixed_batch(tmp_path)
    prompts = tte.encoder.encode(inputs)
    assert [tuple(p.video_grid_thw.tolist()[0]) if p.video_grid_thw is not None else None for p in prompts] \
        == [(2, 4, 4), None, (3, 4, 6), None]
    vid = tte.backbone.model.config.video_token_id
    assert [p.ids.count(vid) for p in prompts] == [8, 0, 18, 0]
    emb, traces = tte.think_then_embed(inputs, max_new_tokens=6)
    assert (emb - tte.embed_recompute(inputs, traces)).abs().max() <= TOL
    assert (tte.embed(inputs) - tte.embed_recompute(inputs)).abs().max() <= TOL


def test_think_then_embed_of_a_row_does_not_depend_on_its_batch(tmp_path, one_torch_thread):
    tte = UnifiedTTE(tiny_qwen2vl(), mode="activated")
    randomize_adapters(tte, std=0.15, seed=2)
    inputs = mixed_batch(tmp_path)
    together, traces = tte.think_then_embed(inputs, max_new_tokens=5)
    for row in (0, 2):
        alone, alone_traces = tte.think_then_embed([inputs[row]], max_new_tokens=5)
        assert alone_traces[0].token_ids == traces[row].token_ids
        assert (alone[0] - together[row]).abs().max() <= 1e-4


def test_the_video_changes_the_embedding():
    tte = UnifiedTTE(tiny_qwen2vl(), mode="activated")
    randomize_adapters(tte, std=0.15, seed=3)
    a = tte.embed([TTEInput("clip", videos=[frames(4, seed=5)])])
    b = tte.embed([TTEInput("clip", videos=[frames(4, seed=6)])])
    assert (a - b).abs().max() > 1e-4


def test_folders_are_sampled_evenly_in_natural_order(tmp_path):
    folder = write_frame_folder(tmp_path / "v", 12)
    assert [p.name for p in frame_files(folder)][8:11] == ["frame_9.png", "frame_10.png", "frame_11.png"]
    assert evenly(list(range(12)), 4) == [0, 4, 7, 11]
    got = load_frames(Video(folder, max_frames=4), 0)
    direct = [np.asarray(Image.open(folder / f"frame_{i}.png")) for i in (1, 5, 8, 12)]
    assert all((np.asarray(g) == d).all() for g, d in zip(got, direct)) and len(got) == 4


def test_a_video_folder_with_no_frames_names_the_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    tte = UnifiedTTE(tiny_qwen2vl(), mode="activated")
    with pytest.raises(InputError, match=r"input 0: video folder '.*empty' holds no frame images"):
        tte.embed([TTEInput("x", videos=[str(tmp_path / "empty")])])


def test_a_video_file_is_decoded_at_fps_and_capped_to_max_frames(tmp_path):
    av = pytest.importorskip("av")
    path = tmp_path / "clip.mp4"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=4)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(16):                                   # 4 s at 4 frames per second
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), i * 15, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    one_per_second = load_frames(Video(path, fps=1.0, max_frames=100), 0)
    assert len(one_per_second) == 4
    brightness = [np.asarray(f).mean() for f in one_per_second]
    assert brightness == sorted(brightness) and brightness[-1] - brightness[0] > 100
    assert len(load_frames(Video(path, fps=4.0, max_frames=6), 0)) == 6
    tte = UnifiedTTE(tiny_qwen2vl(), mode="activated")
    assert tte.embed([TTEInput("clip", videos=[Video(path, max_frames=2)])]).shape == (1, 64)
