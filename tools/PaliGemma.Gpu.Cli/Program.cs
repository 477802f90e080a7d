using PaliGemma.CpuOnly.Backends.ILGPU;
using PaliGemma.CpuOnly.Kernels.Backends;
using PaliGemma.Cli;
using CliProgram = PaliGemma.Cli.Program;

namespace PaliGemma.Gpu.Cli;

/// <summary>
/// paligemma-gpu: every paligemma command, computing on a GPU through ILGPU. It picks the device named by --device,
/// says on stderr which one it uses, and falls back to the CPU backend when that device cannot be used.
/// </summary>
public static class Program
{
    public const string Usage = """
        paligemma-gpu: paligemma on a GPU (CUDA or OpenCL through ILGPU; a JIT build, not NativeAOT).

        Usage:
          paligemma-gpu [--device auto|cuda|opencl|ilgpu-cpu|cpu] COMMAND [options]
          paligemma-gpu devices                        list the devices ILGPU can use

          --device auto       CUDA if present, else an OpenCL GPU, else the CPU backend (default)
          --device cuda       the CUDA GPU with the most memory
          --device opencl     the OpenCL device with the most memory (GPUs first)
          --device ilgpu-cpu  ILGPU's CPU simulator (very slow; for checking the GPU kernels without a GPU)
          --device cpu        the library's CPU backend (what paligemma uses)
          A device that cannot be opened falls back to the CPU backend, with a message on stderr.

        COMMAND and its options are those of paligemma:

        """;

    public static int Main(string[] args)
    {
        string? device;
        string[] rest;
        try
        {
            (device, rest) = TakeDevice(args);
        }
        catch (ArgumentException e)
        {
            Console.Error.WriteLine($"paligemma-gpu: {e.Message} (see 'paligemma-gpu help')");
            return 2;
        }
        if (rest.Length == 0 || rest[0] is "help" or "--help" or "-h")
        {
            Console.Out.WriteLine(Usage + CliProgram.Usage);
            return rest.Length == 0 ? 2 : 0;
        }
        if (rest[0] == "devices")
            return ListDevices();
        if (rest[0] == "--version")
            return CliProgram.Main(rest);

        IComputeBackend backend = Open(device ?? "auto");
        Console.Error.WriteLine($"paligemma-gpu: computing on {backend.Name}");
        if (ConcurrencyError(rest, backend.IsHost) is { } concurrencyError)
        {
            Console.Error.WriteLine($"paligemma-gpu: {concurrencyError}");
            (backend as IDisposable)?.Dispose();
            return 2;
        }
        CliBackend.Current = backend;
        try
        {
            return CliProgram.Main(rest);
        }
        finally
        {
            CliBackend.Current = null;
            (backend as IDisposable)?.Dispose();
        }
    }

    /// <summary>
    /// A device backend runs one thread's operations at a time (its scratch buffers and queue are shared), so `serve` on a
    /// device must keep one generation at a time; returns the message for a larger --max-concurrency, else null.
    /// </summary>
    internal static string? ConcurrencyError(string[] commandArgs, bool backendIsHost)
    {
        if (backendIsHost || commandArgs.Length == 0 || commandArgs[0] != "serve")
            return null;
        for (int i = 1; i < commandArgs.Length; i++)
        {
            string? value = commandArgs[i] == "--max-concurrency" && i + 1 < commandArgs.Length ? commandArgs[i + 1]
                : commandArgs[i].StartsWith("--max-concurrency=", StringComparison.Ordinal) ? commandArgs[i]["--max-concurrency=".Length..] : null;
            if (value is not null && int.TryParse(value, System.Globalization.CultureInfo.InvariantCulture, out int n) && n > 1)
                return $"--max-concurrency {n}: a GPU device runs one generation at a time; use --max-concurrency 1 (requests beyond it wait in --max-queue)";
        }
        return null;
    }

    /// <summary>Removes "--device NAME" (or "--device=NAME") from anywhere in the arguments.</summary>
    internal static (string? Device, string[] Remaining) TakeDevice(string[] args)
    {
        string? device = null;
        var rest = new List<string>(args.Length);
        for (int i = 0; i < args.Length; i++)
        {
            string value;
            if (args[i] == "--device")
            {
                if (i + 1 >= args.Length)
                    throw new ArgumentException("--device needs a value: auto, cuda, opencl, ilgpu-cpu or cpu");
                value = args[++i];
            }
            else if (args[i].StartsWith("--device=", StringComparison.Ordinal))
            {
                value = args[i]["--device=".Length..];
            }
            else
            {
                rest.Add(args[i]);
                continue;
            }
            if (device is not null)
                throw new ArgumentException("--device is given twice");
            if (value is not ("auto" or "cuda" or "opencl" or "ilgpu-cpu" or "cpu"))
                throw new ArgumentException($"unknown --device '{value}'; use auto, cuda, opencl, ilgpu-cpu or cpu");
            device = value;
        }
        return (device, [.. rest]);
    }

    /// <summary>The backend for a --device value; the CPU backend, with a message, when the device cannot be opened.</summary>
    internal static IComputeBackend Open(string device)
    {
        if (device == "cpu")
            return CpuBackend.Instance;
        if (device == "auto")
        {
            // The simulator is far slower than the CPU backend: auto only takes real GPUs.
            foreach (var kind in new[] { IlgpuDevice.Cuda, IlgpuDevice.OpenCL })
            {
                if (TryCreate(kind, out var gpu, out _))
                    return gpu;
            }
            Console.Error.WriteLine("paligemma-gpu: no CUDA or OpenCL GPU found; using the CPU backend");
            return CpuBackend.Instance;
        }
        var requested = device switch
        {
            "cuda" => IlgpuDevice.Cuda,
            "opencl" => IlgpuDevice.OpenCL,
            _ => IlgpuDevice.Cpu,
        };
        if (TryCreate(requested, out var backend, out string? error))
            return backend;
        Console.Error.WriteLine($"paligemma-gpu: --device {device} is unusable ({error}); falling back to the CPU backend");
        return CpuBackend.Instance;
    }

    private static bool TryCreate(IlgpuDevice kind, out IComputeBackend backend, out string? error)
    {
        try
        {
            backend = IlgpuBackend.Create(kind);
            error = null;
            return true;
        }
        catch (Exception e) when (e is InvalidOperationException or NotSupportedException or DllNotFoundException
                                       or TypeInitializationException or ILGPU.Runtime.AcceleratorException)
        {
            backend = CpuBackend.Instance;
            error = e.Message;
            return false;
        }
    }

    private static int ListDevices()
    {
        var devices = IlgpuBackend.ListDevices();
        foreach (var device in devices)
        {
            string memory = device.Kind == IlgpuDevice.Cpu ? "host memory" : $"{device.MemoryBytes / (1024 * 1024)} MB";
            Console.Out.WriteLine($"{device.Kind switch { IlgpuDevice.Cuda => "cuda", IlgpuDevice.OpenCL => "opencl", _ => "ilgpu-cpu" },-10} {device.Name} ({memory})");
        }
        Console.Out.WriteLine($"{"cpu",-10} {CpuBackend.Instance.Name}");
        return 0;
    }
}
