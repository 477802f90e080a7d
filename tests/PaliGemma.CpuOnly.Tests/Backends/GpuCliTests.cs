using PaliGemma.CpuOnly.Backends.ILGPU;
using PaliGemma.CpuOnly.Kernels.Backends;
using GpuProgram = PaliGemma.Gpu.Cli.Program;

namespace PaliGemma.CpuOnly.Tests.Backends;

public sealed class GpuCliTests
{
    [Fact]
    public void Device_option_is_taken_from_anywhere_and_checked()
    {
        var (device, rest) = GpuProgram.TakeDevice(["generate", "--model", "m", "--device", "cuda", "--prompt", "p"]);
        Assert.Equal("cuda", device);
        Assert.Equal(["generate", "--model", "m", "--prompt", "p"], rest);
        Assert.Equal("ilgpu-cpu", GpuProgram.TakeDevice(["--device=ilgpu-cpu", "bench"]).Device);
        Assert.Null(GpuProgram.TakeDevice(["bench", "--model", "m"]).Device);
        Assert.Contains("unknown --device 'tpu'", Assert.Throws<ArgumentException>(() => GpuProgram.TakeDevice(["--device", "tpu"])).Message);
        Assert.Contains("needs a value", Assert.Throws<ArgumentException>(() => GpuProgram.TakeDevice(["bench", "--device"])).Message);
        Assert.Contains("twice", Assert.Throws<ArgumentException>(() => GpuProgram.TakeDevice(["--device", "cpu", "--device=cuda"])).Message);
    }

    [Fact]
    public void An_unusable_device_falls_back_to_the_cpu_backend()
    {
        Assert.Same(CpuBackend.Instance, GpuProgram.Open("cpu"));
        if (!IlgpuBackend.ListDevices().Any(d => d.Kind == IlgpuDevice.Cuda))
            Assert.Same(CpuBackend.Instance, GpuProgram.Open("cuda"));
        var simulator = GpuProgram.Open("ilgpu-cpu");
        Assert.Equal("ilgpu-cpu", simulator.Name);
        ((IDisposable)simulator).Dispose();
    }

    [Fact]
    public void Serve_on_a_device_keeps_one_generation_at_a_time()
    {
        string? Error(bool host, params string[] args) => PaliGemma.Gpu.Cli.Program.ConcurrencyError(args, host);
        Assert.Contains("--max-concurrency 1", Error(false, "serve", "--model", "m", "--max-concurrency", "2"));
        Assert.Contains("--max-concurrency 3", Error(false, "serve", "--max-concurrency=3", "--model", "m"));
        Assert.Null(Error(false, "serve", "--model", "m", "--max-concurrency", "1"));
        Assert.Null(Error(false, "serve", "--model", "m"));
        Assert.Null(Error(true, "serve", "--model", "m", "--max-concurrency", "4"));    // the CPU backend is thread-safe
        Assert.Null(Error(false, "generate", "--max-concurrency", "4"));
    }
}
