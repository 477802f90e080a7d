using PaliGemma.Bench.Onnx;

namespace PaliGemma.Bench.Pairs;

/// <summary>
/// One kernel call of ours and the equivalent single-op ONNX graph in ONNX Runtime, on the same input data.
/// Construction runs both once and throws when they disagree beyond <see cref="Tolerance"/>.
/// </summary>
internal abstract class KernelPair : IDisposable
{
    /// <summary>Largest accepted max|ours - ORT| / max|ORT| over the output.</summary>
    public const double Tolerance = 1e-3;

    private readonly List<IDisposable> _owned = [];
    private OrtRunner? _ort;

    protected KernelPair(string name) => Name = name;

    public string Name { get; }

    /// <summary>Floating-point operations per call (0 when the kernel is better measured in bytes).</summary>
    public double Flops { get; protected init; }
    /// <summary>Bytes our kernel must read or write per call (weights at their stored width).</summary>
    public double OurBytes { get; protected init; }
    /// <summary>Bytes ORT must read or write per call (weights as fp32).</summary>
    public double OrtBytes { get; protected init; }
    /// <summary>What ORT was given that differs from what we run, for the printed table.</summary>
    public string Note { get; protected init; } = "";

    /// <summary>max|ours - ORT| / max|ORT| from the check at setup.</summary>
    public double MaxRelativeDiff { get; private set; }

    public abstract void RunOurs();

    public void RunOrt() => _ort!.Run();

    protected T Own<T>(T item) where T : IDisposable
    {
        _owned.Add(item);
        return item;
    }

    protected NativeBuffer Buffer(long length) => Own(new NativeBuffer(length));

    protected void StartOrt(OnnxModelBuilder model, (string, NativeBuffer, long[])[] inputs, (string, NativeBuffer, long[])[] outputs) =>
        _ort = Own(new OrtRunner(model, inputs, outputs));

    /// <summary>Runs both once and compares; <paramref name="ortValueAt"/> maps our output index to ORT's (layouts may differ).</summary>
    protected unsafe void Check(NativeBuffer ours, NativeBuffer ort, long count, Func<long, long>? ortValueAt = null)
    {
        RunOurs();
        RunOrt();
        double maxDiff = 0, maxRef = 0;
        for (long i = 0; i < count; i++)
        {
            double reference = ort.Pointer[ortValueAt is null ? i : ortValueAt(i)];
            double value = ours.Pointer[i];
            if (!double.IsFinite(value) || !double.IsFinite(reference))
                throw new InvalidOperationException($"{Name}: non-finite output at {i} (ours {value}, ORT {reference})");
            maxDiff = Math.Max(maxDiff, Math.Abs(value - reference));
            maxRef = Math.Max(maxRef, Math.Abs(reference));
        }
        MaxRelativeDiff = maxRef == 0 ? maxDiff : maxDiff / maxRef;
        if (!(MaxRelativeDiff <= Tolerance))
            throw new InvalidOperationException($"{Name}: ours and ONNX Runtime disagree, max|diff|/max|ORT| = {MaxRelativeDiff:E2} > {Tolerance:E0}");
    }

    public void Dispose()
    {
        for (int i = _owned.Count - 1; i >= 0; i--)
            _owned[i].Dispose();
        _owned.Clear();
    }
}
