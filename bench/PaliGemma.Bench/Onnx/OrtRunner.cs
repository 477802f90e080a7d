using Microsoft.ML.OnnxRuntime;
using Microsoft.ML.OnnxRuntime.Tensors;

namespace PaliGemma.Bench.Onnx;

/// <summary>
/// An ONNX Runtime session over native buffers the caller owns: inputs and outputs are bound once as OrtValues
/// wrapping that memory, so a timed <see cref="Run"/> allocates nothing on either side.
/// </summary>
internal sealed unsafe class OrtRunner : IDisposable
{
    /// <summary>The threads ORT's intra-op pool gets, and so the threads our kernels get in the comparison.</summary>
    public const int Threads = 2;

    private readonly InferenceSession _session;
    private readonly RunOptions _runOptions = new();
    private readonly string[] _inputNames;
    private readonly OrtValue[] _inputs;
    private readonly string[] _outputNames;
    private readonly OrtValue[] _outputs;

    public OrtRunner(OnnxModelBuilder model, (string Name, NativeBuffer Buffer, long[] Shape)[] inputs, (string Name, NativeBuffer Buffer, long[] Shape)[] outputs)
    {
        _session = OpenSession(model);
        _inputNames = inputs.Select(i => i.Name).ToArray();
        _inputs = inputs.Select(i => Wrap(i.Buffer, i.Shape)).ToArray();
        _outputNames = outputs.Select(o => o.Name).ToArray();
        _outputs = outputs.Select(o => Wrap(o.Buffer, o.Shape)).ToArray();
    }

    /// <summary>Saves the model to a scratch folder, opens it with <see cref="Threads"/> intra-op threads and ORT_ENABLE_ALL, removes the folder.</summary>
    public static InferenceSession OpenSession(OnnxModelBuilder model)
    {
        string directory = Path.Combine(Path.GetTempPath(), $"paligemma-ortbench-{Environment.ProcessId}-{Guid.NewGuid():N}");
        try
        {
            string path = model.Save(directory);
            using var options = new SessionOptions
            {
                IntraOpNumThreads = Threads,
                InterOpNumThreads = 1,
                ExecutionMode = ExecutionMode.ORT_SEQUENTIAL,
                // PALIGEMMA_BENCH_ORT_OPT=basic|extended|none is for telling an ORT fusion apart from a graph error.
                GraphOptimizationLevel = Environment.GetEnvironmentVariable("PALIGEMMA_BENCH_ORT_OPT") switch
                {
                    "none" => GraphOptimizationLevel.ORT_DISABLE_ALL,
                    "basic" => GraphOptimizationLevel.ORT_ENABLE_BASIC,
                    "extended" => GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                    _ => GraphOptimizationLevel.ORT_ENABLE_ALL,
                },
            };
            // PALIGEMMA_BENCH_ORT_PROFILE=PREFIX writes ORT's per-node timings (JSON, PREFIX_<date>.json) when the session closes.
            if (Environment.GetEnvironmentVariable("PALIGEMMA_BENCH_ORT_PROFILE") is { Length: > 0 } profilePrefix)
            {
                options.ProfileOutputPathPrefix = profilePrefix;   // before enabling: ORT takes the prefix then
                options.EnableProfiling = true;
            }
            return new InferenceSession(path, options);
        }
        finally
        {
            // ORT has read (and pre-packed) the initializers by now; the files are no longer needed.
            if (Directory.Exists(directory))
                Directory.Delete(directory, recursive: true);
        }
    }

    public void Run() => _session.Run(_runOptions, _inputNames, _inputs, _outputNames, _outputs);

    private static OrtValue Wrap(NativeBuffer buffer, long[] shape)
    {
        long count = 1;
        foreach (long d in shape)
            count *= d;
        if (count > buffer.Length)
            throw new ArgumentException($"shape [{string.Join(", ", shape)}] needs {count} floats; the buffer holds {buffer.Length}", nameof(shape));
        return OrtValue.CreateTensorValueWithData(OrtMemoryInfo.DefaultInstance, TensorElementType.Float, shape, (nint)buffer.Pointer, count * sizeof(float));
    }

    public void Dispose()
    {
        foreach (var v in _inputs) v.Dispose();
        foreach (var v in _outputs) v.Dispose();
        _runOptions.Dispose();
        _session.Dispose();
    }
}
