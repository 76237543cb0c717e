"""benchmarks/profile_train.py: the kernel/operator categories and a tiny CPU profile."""
import gzip
import json
import re
from types import SimpleNamespace

import pytest
from torch.autograd import DeviceType

from benchmarks import profile_train


@pytest.mark.parametrize("name, category", [
    # CUDA kernel names as cuDNN, PyTorch and Inductor call them
    ("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_ndhwc_kndhwc_ndhwc_tilesize128x128x64", "convolution"),
    ("sm80_xmma_wgrad_implicit_gemm_indexed_f32f32_tf32f32_f32_nhwckrsc_nchw", "convolution"),
    ("void cudnn::bn_fw_tr_1C11_kernel_NCHW<float, float, int, 512, true, 1>", "normalisation"),
    ("void at::native::batch_norm_collect_statistics_kernel<InvStd, float, float, float, int>", "normalisation"),
    ("void cudnn::ops::nchwToNhwcKernel<__nv_bfloat16, __nv_bfloat16, float, false, true>", "layout conversion"),
    # Inductor's kernels are the compiled share whatever ops they fuse
    ("triton_poi_fused_add_leaky_relu_native_group_norm_3", "compiled (triton)"),
    ("triton_poi_fused_convolution_0", "compiled (triton)"),
    ("triton_red_fused_mul_sum_12", "compiled (triton)"),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedSgdMathFunctor>", "optimiser"),
    ("Memcpy DtoD (Device -> Device)", "copy"),
    ("void at::native::elementwise_kernel<128, 2, direct_copy_kernel_cuda(at::TensorIteratorBase&)>", "copy"),
    ("void at::native::vectorized_elementwise_kernel<4, leaky_relu_kernel(at::TensorIteratorBase&)>",
     "elementwise, other"),
    # CPU operators
    ("aten::mkldnn_convolution", "convolution"),
    ("aten::convolution_backward", "convolution"),
    ("aten::native_batch_norm", "normalisation"),
    ("Optimizer.step#SGD.step", "optimiser"),
    ("aten::leaky_relu", "elementwise, other"),
])
def test_classify(name, category):
    assert profile_train.classify(name) == category


def event(key, device_type, device_us=0, cpu_us=0, annotation=False):
    return SimpleNamespace(key=key, device_type=device_type, self_device_time_total=device_us,
                           self_cpu_time_total=cpu_us, is_user_annotation=annotation)


def test_category_times_count_kernels_on_a_device_and_operators_on_a_cpu():
    averages = [
        event("aten::cudnn_convolution", DeviceType.CPU, device_us=300, cpu_us=40),  # its kernel's time again
        event("sm90_xmma_fprop_implicit_gemm_bf16", DeviceType.CUDA, device_us=300),
        event("sm90_xmma_dgrad_implicit_gemm_bf16", DeviceType.CUDA, device_us=200),
        event("triton_poi_fused_add_0", DeviceType.CUDA, device_us=50),
        event("ProfilerStep#1", DeviceType.CUDA, device_us=900, annotation=True),  # a span, not work
        event("aten::leaky_relu", DeviceType.CPU, cpu_us=10),
    ]
    assert profile_train.category_times(averages, on_device=True) == {"convolution": 500, "compiled (triton)": 50}
    assert profile_train.category_times(averages, on_device=False) == {"convolution": 40, "elementwise, other": 10}
    lines = profile_train.format_categories({"convolution": 500, "compiled (triton)": 50}, 1100, on_device=True)
    assert re.search(r"^convolution +0\.5 +90\.9%$", lines[1])
    assert lines[-1].startswith("device busy 0.6 ms of 1.1 ms wall (50%")


def test_a_tiny_cpu_profile(tmp_path, capsys):
    trace = tmp_path / "trace.json.gz"
    profile_train.main(["--device", "cpu", "--model", "small", "--patch", "16,32,32", "--shape", "64,64,32",
                        "--variant", "fp32", "--stage", "stage 2", "--warmup", "1", "--steps", "2",
                        "--threads", "1", "--trace", str(trace)])
    out = capsys.readouterr().out
    assert "stage 2, variant fp32 (amp off, channels_last off, compile off) | 2 profiled steps" in out
    shares = {m[0].strip(): float(m[2]) for m in re.findall(r"^([^\d\n]+?) +([\d.]+) +([\d.]+)%$", out, re.M)}
    assert shares["convolution"] > 10 and sum(shares.values()) == pytest.approx(100, abs=0.5)
    assert "aten::convolution_backward" in out  # the top table
    events = json.loads(gzip.decompress(trace.read_bytes()))["traceEvents"]
    assert any(e.get("name") == "aten::convolution_backward" for e in events)


def test_a_folder_as_trace_is_refused_before_the_profile(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        profile_train.parse_args(["--device", "cpu", "--trace", str(tmp_path)])
    assert stop.value.code == 2
    assert f"--trace {tmp_path} is a folder: give a file, e.g. {tmp_path / 'trace.json.gz'}" in capsys.readouterr().err
