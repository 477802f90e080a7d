using System.Runtime.CompilerServices;
using ILGPU;
using ILGPU.Runtime;
using ILGPU.Runtime.CPU;
using ILGPU.Runtime.Cuda;
using ILGPU.Runtime.OpenCL;
using PaliGemma.CpuOnly.Backends.ILGPU.Kernels;
using PaliGemma.CpuOnly.Kernels;
using PaliGemma.CpuOnly.Kernels.Backends;
using PaliGemma.CpuOnly.Quant;
using PaliGemma.CpuOnly.Tensors;

namespace PaliGemma.CpuOnly.Backends.ILGPU;

/// <summary>
/// A compute backend on an ILGPU accelerator (CUDA, OpenCL, or ILGPU's CPU simulator). Buffers live in device memory;
/// weights are copied once, in their stored format (f32, bf16, f16, q8 or nf4 blocks), and widened or dequantized in the
/// kernels, which accumulate in fp32. Operations are queued on the accelerator's default stream; <see cref="Read"/> waits.
/// </summary>
/// <remarks>
/// ILGPU compiles kernels from IL at run time, so this backend needs a JIT host (not NativeAOT). One instance serves one
/// thread at a time, like every backend. Kernels are compiled on first use and cached for the backend's lifetime.
/// </remarks>
public sealed class IlgpuBackend : IComputeBackend, IDisposable
{
    private readonly Context _context;
    private readonly Accelerator _accelerator;
    private readonly AcceleratorStream _stream;
    private readonly UploadCache<int> _attentionRanges;
    private readonly UploadCache<float> _ropeTables;
    private readonly MemoryBuffer1D<float, Stride1D.Dense> _placeholder;   // bound to unused kernel arguments
    private readonly Dictionary<Type, object> _matMulKernels = [];
    private MemoryBuffer1D<float, Stride1D.Dense>? _nf4Table;
    private bool _disposed;

    // Host scratch reused between calls (keys of the upload caches, the rotary table).
    private int[] _keyScratch = new int[64];
    private float[] _tableScratch = new float[256];
    private float[] _inverseFrequencies = new float[128];

    private Action<KernelConfig, ArrayView<float>, ArrayView<float>, ArrayView<float>>? _add;
    private Action<KernelConfig, ArrayView<float>, float, ArrayView<float>>? _scale;
    private Action<KernelConfig, ArrayView<float>, ArrayView<float>>? _gelu;
    private Action<KernelConfig, ArrayView<float>, ArrayView<float>, ArrayView<float>>? _geluMul;
    private Action<KernelConfig, ArrayView<float>, ArrayView<float>, ArrayView<float>, int, int, float, float>? _rmsNorm;
    private Action<KernelConfig, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, int, int, float, int>? _layerNorm;
    private Action<KernelConfig, ArrayView<float>, ArrayView<float>, long, RopeShape>? _rope;
    private Action<KernelConfig, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<int>, ArrayView<float>, AttentionShape>? _attentionBlocks;
    private Action<KernelConfig, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<int>, ArrayView<float>, AttentionShape>? _attentionSplit;

    private IlgpuBackend(Context context, Accelerator accelerator, IlgpuDevice device)
    {
        _context = context;
        _accelerator = accelerator;
        _stream = accelerator.DefaultStream;
        Device = device;
        Name = device switch
        {
            IlgpuDevice.Cuda => $"cuda: {accelerator.Name}",
            IlgpuDevice.OpenCL => $"opencl: {accelerator.Name}",
            _ => "ilgpu-cpu",
        };

        int maxGroup = accelerator.MaxNumThreadsPerGroup;
        ReduceGroupSize = FloorPowerOfTwo(Math.Min(VectorKernels.MaxGroup, maxGroup));
        GemvGroupSize = FloorPowerOfTwo(Math.Min(MatMulKernels.GemvMaxGroup, maxGroup));
        AttentionGroupSize = FloorPowerOfTwo(Math.Min(64, maxGroup));
        StreamGroupSize = FloorPowerOfTwo(Math.Min(256, maxGroup));
        // Groups resident at once (multiprocessors x groups each holds), four waves of them.
        int residentGroups = accelerator.NumMultiprocessors * Math.Max(1, accelerator.MaxNumThreadsPerMultiprocessor / StreamGroupSize);
        StreamGroupLimit = Math.Max(1, 4 * residentGroups);
        TileSide = FloorPowerOfTwo(Math.Min(MatMulKernels.MaxTile / MatMulKernels.ThreadBlock, (int)Math.Sqrt(maxGroup)));

        _attentionRanges = new UploadCache<int>(accelerator, slots: 4);
        _ropeTables = new UploadCache<float>(accelerator, slots: 2);
        _placeholder = accelerator.Allocate1D<float>(1);
        _placeholder.MemSetToZero(_stream);
    }

    /// <summary>
    /// Opens an accelerator of the requested kind. Throws <see cref="InvalidOperationException"/> naming the kind when
    /// ILGPU finds no usable device of it (no driver, no device, or an OpenCL device ILGPU does not support).
    /// </summary>
    public static IlgpuBackend Create(IlgpuDevice kind = IlgpuDevice.Auto)
    {
        if (!Enum.IsDefined(kind))
            throw new ArgumentOutOfRangeException(nameof(kind), kind, "unknown ILGPU device kind");
        var context = Context.Create(builder =>
        {
            builder.EnableAlgorithms();
            if (kind is IlgpuDevice.Auto or IlgpuDevice.Cuda) builder.Cuda();
            if (kind is IlgpuDevice.Auto or IlgpuDevice.OpenCL) builder.OpenCL();
            if (kind is IlgpuDevice.Auto or IlgpuDevice.Cpu) builder.CPU(CPUDeviceKind.Default);
        });
        try
        {
            var (device, resolved) = Pick(context, kind);
            if (device is null)
                throw new InvalidOperationException($"ILGPU found no usable {KindName(kind)} device (devices it sees: {Describe(context)})");
            return new IlgpuBackend(context, device.CreateAccelerator(context), resolved);
        }
        catch
        {
            context.Dispose();
            throw;
        }
    }

    /// <summary>ILGPU's CPU simulator with a chosen geometry (tests use small groups: their barriers are far cheaper).</summary>
    internal static IlgpuBackend CreateCpuSimulator(int threadsPerWarp, int warpsPerGroup, int groupsInParallel = 1)
    {
        var cpu = new CPUDevice(threadsPerWarp, warpsPerGroup, groupsInParallel);
        var context = Context.Create(builder => builder.EnableAlgorithms().CPU(cpu));
        try
        {
            return new IlgpuBackend(context, cpu.CreateAccelerator(context), IlgpuDevice.Cpu);
        }
        catch
        {
            context.Dispose();
            throw;
        }
    }

    /// <summary>Every device ILGPU can use on this machine: CUDA and OpenCL devices, then its CPU simulator.</summary>
    public static IReadOnlyList<IlgpuDeviceInfo> ListDevices()
    {
        using var context = Context.Create(builder => builder.Cuda().OpenCL().CPU(CPUDeviceKind.Default));
        var devices = new List<IlgpuDeviceInfo>();
        foreach (var device in context)
        {
            if (KindOf(device) is { } kind)
                devices.Add(new IlgpuDeviceInfo(kind, device.Name, device.MemorySize));
        }
        return devices;
    }

    private static (Device? Device, IlgpuDevice Kind) Pick(Context context, IlgpuDevice kind)
    {
        if (kind is IlgpuDevice.Auto or IlgpuDevice.Cuda)
        {
            Device? best = null;
            foreach (var device in context.GetCudaDevices())
            {
                if (best is null || device.MemorySize > best.MemorySize)
                    best = device;
            }
            if (best is not null)
                return (best, IlgpuDevice.Cuda);
        }
        if (kind is IlgpuDevice.Auto or IlgpuDevice.OpenCL)
        {
            // GPUs first, the most memory first; an OpenCL CPU runtime only when OpenCL is asked for by name.
            CLDevice? best = null;
            foreach (var device in context.GetCLDevices())
            {
                bool gpu = device.DeviceType == CLDeviceType.CL_DEVICE_TYPE_GPU;
                if (!gpu && kind != IlgpuDevice.OpenCL)
                    continue;
                bool bestGpu = best?.DeviceType == CLDeviceType.CL_DEVICE_TYPE_GPU;
                if (best is null || (gpu && !bestGpu) || (gpu == bestGpu && device.MemorySize > best.MemorySize))
                    best = device;
            }
            if (best is not null)
                return (best, IlgpuDevice.OpenCL);
        }
        if (kind is IlgpuDevice.Auto or IlgpuDevice.Cpu)
        {
            foreach (var device in context.GetCPUDevices())
                return (device, IlgpuDevice.Cpu);
        }
        return (null, kind);
    }

    private static IlgpuDevice? KindOf(Device device) => device.AcceleratorType switch
    {
        AcceleratorType.Cuda => IlgpuDevice.Cuda,
        AcceleratorType.OpenCL => IlgpuDevice.OpenCL,
        AcceleratorType.CPU => IlgpuDevice.Cpu,
        _ => null,
    };

    private static string KindName(IlgpuDevice kind) => kind switch
    {
        IlgpuDevice.Cuda => "CUDA",
        IlgpuDevice.OpenCL => "OpenCL",
        IlgpuDevice.Cpu => "CPU-simulator",
        _ => "ILGPU",
    };

    private static string Describe(Context context)
    {
        var names = context.Devices.Select(d => $"{d.AcceleratorType}: {d.Name}").ToArray();
        return names.Length == 0 ? "none" : string.Join("; ", names);
    }

    private static int FloorPowerOfTwo(int value) => value <= 1 ? 1 : 1 << (31 - int.LeadingZeroCount(value));

    private static int CeilingPowerOfTwo(int value) => value <= 1 ? 1 : 1 << (32 - int.LeadingZeroCount(value - 1));

    /// <summary>"cuda: NVIDIA ...", "opencl: ...", or "ilgpu-cpu".</summary>
    public string Name { get; }

    /// <summary>The kind of accelerator opened (never <see cref="IlgpuDevice.Auto"/>).</summary>
    public IlgpuDevice Device { get; }

    public bool IsHost => false;

    /// <summary>Device memory in bytes.</summary>
    public long DeviceMemoryBytes => _accelerator.MemorySize;

    internal bool IsDisposed => _disposed;
    internal int ReduceGroupSize { get; }
    internal int GemvGroupSize { get; }
    internal int AttentionGroupSize { get; }
    internal int StreamGroupSize { get; }
    internal int StreamGroupLimit { get; }
    /// <summary>GEMM groups are TileSide x TileSide threads computing a (8·TileSide)² tile.</summary>
    internal int TileSide { get; }

    public DeviceBuffer Allocate(long length)
    {
        ThrowIfDisposed();
        ArgumentOutOfRangeException.ThrowIfNegative(length);
        var memory = _accelerator.Allocate1D<float>(Math.Max(1, length));
        memory.MemSetToZero(_stream);
        return new IlgpuBuffer(this, memory, length);
    }

    public void Write(ReadOnlySpan<float> source, DeviceSpan destination)
    {
        var view = View(destination, nameof(destination));
        CheckLength(source.Length, destination, nameof(source));
        if (source.IsEmpty)
            return;
        view.CopyFromCPU(_stream, source);
        // The copy may read host memory after it returns (OpenCL queues it); the caller may reuse source at once.
        _stream.Synchronize();
    }

    public void Read(DeviceSpan source, Span<float> destination)
    {
        var view = View(source, nameof(source));
        CheckLength(destination.Length, source, nameof(destination));
        if (destination.IsEmpty)
        {
            _stream.Synchronize();
            return;
        }
        view.CopyToCPU(_stream, destination);
        _stream.Synchronize();
    }

    public ResidentMatrix Upload(IMatrixOperand weight, ReadOnlySpan<float> bias)
    {
        ThrowIfDisposed();
        ArgumentNullException.ThrowIfNull(weight);
        if (!bias.IsEmpty && bias.Length != weight.Rows)
            throw new ArgumentException($"a bias must be empty or hold N = {weight.Rows} floats, not {bias.Length}", nameof(bias));

        var memory = new List<MemoryBuffer>(3);
        try
        {
            ArrayView<float> biasView = _placeholder.View;
            if (!bias.IsEmpty)
            {
                var biasBuffer = _accelerator.Allocate1D<float>(bias.Length);
                memory.Add(biasBuffer);
                biasBuffer.View.CopyFromCPU(_stream, bias);
                biasView = biasBuffer.View;
            }
            IlgpuMatrix matrix = weight switch
            {
                WeightMatrix dense => UploadDense(weight, dense, biasView, bias.Length, memory),
                QuantizedMatrix quantized => UploadQuantized(quantized, biasView, bias.Length, memory),
                _ => throw new NotSupportedException(
                    $"the ILGPU backend cannot make a {weight.GetType().FullName} resident: it reads {nameof(WeightMatrix)} (F32, BF16, F16) and {nameof(QuantizedMatrix)} (q8, nf4)"),
            };
            // The copies read the host memory (often the mapped checkpoint) asynchronously on some devices.
            _stream.Synchronize();
            return matrix;
        }
        catch
        {
            foreach (var buffer in memory)
                buffer.Dispose();
            throw;
        }
    }

    private unsafe IlgpuMatrix UploadDense(IMatrixOperand source, WeightMatrix w, ArrayView<float> bias, int biasLength, List<MemoryBuffer> memory)
    {
        long count = (long)w.Rows * w.Cols;
        switch (w.DType)
        {
            case DType.F32:
            {
                var data = _accelerator.Allocate1D<float>(count);
                memory.Add(data);
                data.View.CopyFromCPU(_stream, ref Unsafe.AsRef<float>(w.Data), count);
                var weights = new Float32Weights { Data = data.View, Cols = w.Cols };
                return new IlgpuMatrix<Float32Weights>(this, source, weights, bias, biasLength, [.. memory]);
            }
            case DType.BF16:
            case DType.F16:
            {
                // The 16-bit values go over as they are stored; the kernels widen them.
                var data = _accelerator.Allocate1D<ushort>(count);
                memory.Add(data);
                data.View.CopyFromCPU(_stream, ref Unsafe.AsRef<ushort>(w.Data), count);
                return w.DType == DType.BF16
                    ? new IlgpuMatrix<BFloat16Weights>(this, source, new BFloat16Weights { Data = data.View, Cols = w.Cols }, bias, biasLength, [.. memory])
                    : new IlgpuMatrix<Float16Weights>(this, source, new Float16Weights { Data = data.View, Cols = w.Cols }, bias, biasLength, [.. memory]);
            }
            default:
                throw new NotSupportedException($"the ILGPU backend cannot read {w.DType} weights ({w}); it reads F32, BF16 and F16");
        }
    }

    private unsafe IlgpuMatrix UploadQuantized(QuantizedMatrix q, ArrayView<float> bias, int biasLength, List<MemoryBuffer> memory)
    {
        var codes = _accelerator.Allocate1D<byte>(q.BlockByteCount);
        memory.Add(codes);
        codes.View.CopyFromCPU(_stream, ref Unsafe.AsRef<byte>(q.Blocks), q.BlockByteCount);
        var scales = _accelerator.Allocate1D<float>(q.ScaleCount);
        memory.Add(scales);
        // The device reads fp32 scales whatever the host stores (fp16 scales are widened once, here).
        var widened = new float[q.ScaleCount];
        for (int row = 0; row < q.Rows; row++)
            q.ReadScales(row, widened.AsSpan(row * q.BlocksPerRow, q.BlocksPerRow));
        scales.View.CopyFromCPU(_stream, widened);
        _stream.Synchronize();
        switch (q.Format)
        {
            case QuantFormat.Q8:
                return new IlgpuMatrix<Q8Weights>(this, q,
                    new Q8Weights { Codes = codes.View, Scales = scales.View, BlocksPerRow = q.BlocksPerRow }, bias, biasLength, [.. memory]);
            case QuantFormat.Nf4:
                if (_nf4Table is null)
                {
                    _nf4Table = _accelerator.Allocate1D<float>(16);
                    _nf4Table.View.CopyFromCPU(_stream, Quantizer.Nf4Codes);
                }
                return new IlgpuMatrix<Nf4Weights>(this, q,
                    new Nf4Weights { Codes = codes.View, Scales = scales.View, Table = _nf4Table.View, BlocksPerRow = q.BlocksPerRow }, bias, biasLength, [.. memory]);
            default:
                throw new NotSupportedException($"the ILGPU backend cannot read {q}: unknown quantization format {q.Format}");
        }
    }

    public void MatMul(DeviceSpan x, int rows, ResidentMatrix weight, DeviceSpan y, float outputSoftCap = 0f)
    {
        ThrowIfDisposed();
        ArgumentNullException.ThrowIfNull(weight);
        if (weight is not IlgpuMatrix matrix || !ReferenceEquals(matrix.Backend, this))
            throw new ArgumentException($"the weight was made resident on '{weight.Backend.Name}', not on '{Name}'", nameof(weight));
        ArgumentOutOfRangeException.ThrowIfNegative(rows);
        if (!(outputSoftCap >= 0f) || float.IsInfinity(outputSoftCap))
            throw new ArgumentOutOfRangeException(nameof(outputSoftCap), outputSoftCap, "the soft-cap must be 0 (none) or positive and finite");
        var xView = View(x, nameof(x));
        var yView = View(y, nameof(y));
        int n = matrix.Rows, k = matrix.Cols;
        if (x.Length < (long)rows * k)
            throw new ArgumentException($"x holds {x.Length} floats; {rows} rows of K = {k} need {(long)rows * k}", nameof(x));
        if (y.Length < (long)rows * n)
            throw new ArgumentException($"y holds {y.Length} floats; {rows} rows of N = {n} need {(long)rows * n}", nameof(y));
        if (rows == 0)
            return;
        if (Overlap(x.Slice(0, (long)rows * k), y.Slice(0, (long)rows * n)))
            throw new ArgumentException("x and y overlap; a matrix product cannot run in place", nameof(y));
        matrix.Multiply(xView, rows, yView, outputSoftCap);
    }

    public void Copy(DeviceSpan source, DeviceSpan destination)
    {
        var from = View(source, nameof(source));
        var to = View(destination, nameof(destination));
        if (source.Length != destination.Length)
            throw new ArgumentException($"copying {source.Length} floats into a range of {destination.Length}", nameof(destination));
        if (source.Length == 0 || (ReferenceEquals(source.Buffer, destination.Buffer) && source.Offset == destination.Offset))
            return;
        if (Overlap(source, destination))
        {
            // Device copies of overlapping ranges are undefined: go through a temporary (rare).
            using var temporary = _accelerator.Allocate1D<float>(source.Length);
            from.CopyTo(_stream, temporary.View);
            temporary.View.CopyTo(_stream, to);
            _stream.Synchronize();
            return;
        }
        from.CopyTo(_stream, to);
    }

    public void Add(DeviceSpan a, DeviceSpan b, DeviceSpan destination)
    {
        var aView = View(a, nameof(a));
        var bView = View(b, nameof(b));
        var dView = View(destination, nameof(destination));
        if (a.Length != b.Length)
            throw new ArgumentException($"b holds {b.Length} floats; a has {a.Length}", nameof(b));
        CheckElementwise(a, destination, nameof(destination));
        CheckElementwise(b, destination, nameof(destination));
        if (a.Length == 0)
            return;
        _add ??= _accelerator.LoadStreamKernel<ArrayView<float>, ArrayView<float>, ArrayView<float>>(VectorKernels.Add);
        _add(Streaming(a.Length), aView, bView, dView);
    }

    public void Scale(DeviceSpan x, float factor, DeviceSpan destination)
    {
        var xView = View(x, nameof(x));
        var dView = View(destination, nameof(destination));
        CheckElementwise(x, destination, nameof(destination));
        if (x.Length == 0)
            return;
        _scale ??= _accelerator.LoadStreamKernel<ArrayView<float>, float, ArrayView<float>>(VectorKernels.Scale);
        _scale(Streaming(x.Length), xView, factor, dView);
    }

    public void GeluTanh(DeviceSpan x, DeviceSpan y)
    {
        var xView = View(x, nameof(x));
        var yView = View(y, nameof(y));
        CheckElementwise(x, y, nameof(y));
        if (x.Length == 0)
            return;
        _gelu ??= _accelerator.LoadStreamKernel<ArrayView<float>, ArrayView<float>>(VectorKernels.GeluTanh);
        _gelu(Streaming(x.Length), xView, yView);
    }

    public void GeluTanhMul(DeviceSpan gate, DeviceSpan up, DeviceSpan y)
    {
        var gView = View(gate, nameof(gate));
        var uView = View(up, nameof(up));
        var yView = View(y, nameof(y));
        if (up.Length != gate.Length)
            throw new ArgumentException($"up holds {up.Length} floats; gate has {gate.Length}", nameof(up));
        CheckElementwise(gate, y, nameof(y));
        CheckElementwise(up, y, nameof(y));
        if (gate.Length == 0)
            return;
        _geluMul ??= _accelerator.LoadStreamKernel<ArrayView<float>, ArrayView<float>, ArrayView<float>>(VectorKernels.GeluTanhMul);
        _geluMul(Streaming(gate.Length), gView, uView, yView);
    }

    public void RmsNorm(DeviceSpan x, DeviceSpan y, int rows, int dim, DeviceSpan weight, float eps, bool unitOffset)
    {
        var xView = View(x, nameof(x));
        var yView = View(y, nameof(y));
        var wView = View(weight, nameof(weight));
        CheckRows(x, y, rows, dim);
        if (weight.Length != dim)
            throw new ArgumentException($"weight holds {weight.Length} floats; it must hold dim = {dim}", nameof(weight));
        if (rows == 0)
            return;
        _rmsNorm ??= _accelerator.LoadStreamKernel<ArrayView<float>, ArrayView<float>, ArrayView<float>, int, int, float, float>(VectorKernels.RmsNorm);
        _rmsNorm(RowGroups(rows, dim), xView, yView, wView, rows, dim, eps, unitOffset ? 1f : 0f);
    }

    public void LayerNorm(DeviceSpan x, DeviceSpan y, int rows, int dim, DeviceSpan gamma, DeviceSpan beta, float eps)
    {
        var xView = View(x, nameof(x));
        var yView = View(y, nameof(y));
        var gView = View(gamma, nameof(gamma));
        bool hasBeta = !beta.IsEmpty;
        var bView = hasBeta ? View(beta, nameof(beta)) : _placeholder.View;
        CheckRows(x, y, rows, dim);
        if (gamma.Length != dim)
            throw new ArgumentException($"gamma holds {gamma.Length} floats; it must hold dim = {dim}", nameof(gamma));
        if (hasBeta && beta.Length != dim)
            throw new ArgumentException($"beta holds {beta.Length} floats; it must be empty or hold dim = {dim}", nameof(beta));
        if (rows == 0)
            return;
        _layerNorm ??= _accelerator.LoadStreamKernel<ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, int, int, float, int>(VectorKernels.LayerNorm);
        _layerNorm(RowGroups(rows, dim), xView, yView, gView, bView, rows, dim, eps, hasBeta ? 1 : 0);
    }

    public void Rope(DeviceSpan x, int rows, int heads, int headDim, int rowStride, ReadOnlySpan<int> positions, float theta)
    {
        var xView = View(x, nameof(x));
        PaliGemma.CpuOnly.Kernels.Rope.CheckOperands(x.Length, rows, heads, headDim, rowStride, positions.Length, theta);
        if (rows == 0)
            return;

        int half = headDim / 2;
        var table = RopeTable(positions[..rows], headDim, theta);
        _rope ??= _accelerator.LoadStreamKernel<ArrayView<float>, ArrayView<float>, long, RopeShape>(VectorKernels.Rope);
        long items = (long)rows * heads * half;
        _rope(Streaming(items), xView, table, items, new RopeShape { Heads = heads, HeadDim = headDim, RowStride = rowStride });
    }

    /// <summary>cos, sin per (row, i), with the CPU kernel's float32 inverse frequencies and angles (see src/Kernels/Rope.cs).</summary>
    private ArrayView<float> RopeTable(ReadOnlySpan<int> positions, int headDim, float theta)
    {
        int rows = positions.Length, half = headDim / 2;
        Span<int> key = Scratch(ref _keyScratch, rows + 2);
        positions.CopyTo(key);
        key[rows] = BitConverter.SingleToInt32Bits(theta);
        key[rows + 1] = headDim;
        if (_ropeTables.TryGet(key, out var cached))
            return cached;

        Span<float> invFreq = Scratch(ref _inverseFrequencies, half);
        for (int i = 0; i < half; i++)
            invFreq[i] = 1f / MathF.Pow(theta, (2 * i) / (float)headDim);
        Span<float> table = Scratch(ref _tableScratch, checked(2 * rows * half));
        for (int r = 0; r < rows; r++)
        {
            Span<float> row = table.Slice(2 * r * half, 2 * half);
            if (r > 0 && positions[r] == positions[r - 1])
            {
                table.Slice(2 * (r - 1) * half, 2 * half).CopyTo(row);
                continue;
            }
            float position = positions[r];
            for (int i = 0; i < half; i++)
            {
                float angle = position * invFreq[i];
                row[2 * i] = (float)Math.Cos(angle);
                row[2 * i + 1] = (float)Math.Sin(angle);
            }
        }
        return _ropeTables.Put(key, table);
    }

    public void Attention(scoped in DeviceAttentionProblem p)
    {
        ThrowIfDisposed();
        Validate(p);
        if (p.Queries == 0)
            return;
        if (p.HeadDim > AttentionKernel.MaxHeadDim)
            throw new NotSupportedException($"the ILGPU attention kernel handles HeadDim up to {AttentionKernel.MaxHeadDim}, not {p.HeadDim}");
        long groups = (long)p.Queries * p.Heads;
        if (groups > int.MaxValue)
            throw new NotSupportedException($"{p.Queries} queries x {p.Heads} heads is more than one attention launch handles");

        var q = View(p.Q, "problem.Q");
        var output = View(p.Output, "problem.Output");
        var k = p.Keys > 0 ? View(p.K, "problem.K") : _placeholder.View;
        var v = p.Keys > 0 ? View(p.V, "problem.V") : _placeholder.View;
        long outputLength = (long)p.Queries * p.Heads * p.HeadDim;
        var written = p.Output.Slice(0, outputLength);
        if (Overlap(written, p.Q) || (p.Keys > 0 && (Overlap(written, p.K) || Overlap(written, p.V))))
            throw new ArgumentException("Output overlaps Q, K or V", "problem.Output");

        bool hasValid = !p.KeyValid.IsEmpty && p.Keys > 0;
        Span<int> ranges = Scratch(ref _keyScratch, 2 * p.Queries + (hasValid ? p.Keys : 0));
        p.KeyStart[..p.Queries].CopyTo(ranges);
        p.KeyEnd[..p.Queries].CopyTo(ranges[p.Queries..]);
        if (hasValid)
        {
            Span<int> valid = ranges.Slice(2 * p.Queries, p.Keys);
            for (int j = 0; j < valid.Length; j++)
                valid[j] = p.KeyValid[j] != 0 ? 1 : 0;
        }
        if (!_attentionRanges.TryGet(ranges, out var meta))
            meta = _attentionRanges.Put(ranges, ranges);

        var shape = new AttentionShape
        {
            QRowStride = p.QRowStride, Queries = p.Queries, KvRowStride = p.KvRowStride,
            Heads = p.Heads, KvHeads = p.KvHeads, HeadDim = p.HeadDim,
            Scale = p.Scale, SoftCap = p.LogitSoftCap, HasValid = hasValid ? 1 : 0,
        };
        // Enough (query, head) rows per KV head to fill a group: query blocks, each K/V tile staged once for the whole
        // block. Fewer (decode): a group per (query, head) with the keys split over its lanes.
        long rowsPerKvHead = (long)p.Queries * (p.Heads / p.KvHeads);
        if (rowsPerKvHead >= AttentionGroupSize)
        {
            int lanes = AttentionGroupSize;
            shape.TileKeys = AttentionKernel.BlockTileKeys(p.HeadDim);
            _attentionBlocks ??= _accelerator.LoadStreamKernel<ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<int>, ArrayView<float>, AttentionShape>(AttentionKernel.QueryBlocks);
            var grid = new Index2D((int)((rowsPerKvHead + lanes - 1) / lanes), p.KvHeads);
            _attentionBlocks(new KernelConfig(grid, new Index2D(lanes, 1)), q, k, v, meta, output, shape);
        }
        else
        {
            int lanes = GroupFor(Math.Max(p.HeadDim, p.Keys), AttentionGroupSize);
            shape.TileKeys = Math.Min(AttentionKernel.MaxSplitTileKeys, lanes * SplitKeysPerLane);
            _attentionSplit ??= _accelerator.LoadStreamKernel<ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<int>, ArrayView<float>, AttentionShape>(AttentionKernel.KeySplit);
            _attentionSplit(new KernelConfig((int)groups, lanes), q, k, v, meta, output, shape);
        }
    }

    /// <summary>Keys each lane scores per tile of the key-split attention (fewer barriers per key).</summary>
    private const int SplitKeysPerLane = 8;

    /// <summary>The checks of <see cref="PaliGemma.CpuOnly.Kernels.Attention"/>, on buffer ranges.</summary>
    private static void Validate(scoped in DeviceAttentionProblem p) =>
        PaliGemma.CpuOnly.Kernels.Attention.CheckProblem(p.Heads, p.KvHeads, p.HeadDim, p.Queries, p.Keys, p.Scale, p.LogitSoftCap,
            p.QRowStride, p.Q.Length, p.Output.Length, p.KvRowStride, p.K.Length, p.V.Length, p.KeyStart, p.KeyEnd, p.KeyValid);

    internal sealed class MatMulKernelPair<TWeights>(Accelerator accelerator) where TWeights : struct, IDeviceWeights
    {
        public readonly Action<KernelConfig, ArrayView<float>, TWeights, ArrayView<float>, ArrayView<float>, MatMulShape> Gemv =
            accelerator.LoadStreamKernel<ArrayView<float>, TWeights, ArrayView<float>, ArrayView<float>, MatMulShape>(MatMulKernels.Gemv);
        public readonly Action<KernelConfig, ArrayView<float>, TWeights, ArrayView<float>, ArrayView<float>, MatMulShape> Gemm =
            accelerator.LoadStreamKernel<ArrayView<float>, TWeights, ArrayView<float>, ArrayView<float>, MatMulShape>(MatMulKernels.Gemm);
    }

    internal MatMulKernelPair<TWeights> MatMulKernelsFor<TWeights>() where TWeights : struct, IDeviceWeights
    {
        ThrowIfDisposed();
        if (!_matMulKernels.TryGetValue(typeof(TWeights), out var kernels))
            _matMulKernels.Add(typeof(TWeights), kernels = new MatMulKernelPair<TWeights>(_accelerator));
        return (MatMulKernelPair<TWeights>)kernels;
    }

    private ArrayView1D<float, Stride1D.Dense> View(DeviceSpan span, string argument)
    {
        ThrowIfDisposed();
        if (span.Buffer is IlgpuBuffer buffer && ReferenceEquals(buffer.Backend, this))
            return buffer.View(span.Offset, span.Length);
        throw new ArgumentException($"the buffer belongs to '{span.Buffer?.Backend.Name ?? "nothing"}', not to '{Name}'", argument);
    }

    private static bool Overlap(DeviceSpan a, DeviceSpan b) =>
        ReferenceEquals(a.Buffer, b.Buffer) && a.Length > 0 && b.Length > 0 &&
        a.Offset < b.Offset + b.Length && b.Offset < a.Offset + a.Length;

    /// <summary>An element-wise output must hold the input and be either exactly it (in place) or apart from it.</summary>
    private static void CheckElementwise(DeviceSpan input, DeviceSpan output, string argument)
    {
        if (output.Length < input.Length)
            throw new ArgumentException($"{argument} holds {output.Length} floats; the input has {input.Length}", argument);
        if (Overlap(input, output.Slice(0, input.Length)) && input.Offset != output.Offset)
            throw new ArgumentException($"{argument} partially overlaps an input; element-wise operations run in place or on separate ranges", argument);
    }

    private static void CheckRows(DeviceSpan x, DeviceSpan y, int rows, int dim)
    {
        PaliGemma.CpuOnly.Kernels.Norms.CheckRows(x.Length, y.Length, rows, dim);
        long needed = (long)rows * dim;
        if (Overlap(x.Slice(0, needed), y.Slice(0, needed)) && x.Offset != y.Offset)
            throw new ArgumentException("y partially overlaps x; normalisations run in place or on separate ranges", nameof(y));
    }

    private static void CheckLength(long hostLength, DeviceSpan span, string argument)
    {
        if (hostLength != span.Length)
            throw new ArgumentException($"{hostLength} host floats for a buffer range of {span.Length}", argument);
    }

    /// <summary>
    /// A launch for a kernel that strides over <paramref name="items"/> with the whole grid: groups of
    /// <see cref="StreamGroupSize"/> lanes, no more than the items need nor than <see cref="StreamGroupLimit"/> (a few
    /// waves of the groups the device holds at once), so large tensors take several items per thread.
    /// </summary>
    private KernelConfig Streaming(long items)
    {
        long groups = Math.Clamp((items + StreamGroupSize - 1) / StreamGroupSize, 1, StreamGroupLimit);
        return new KernelConfig((int)groups, StreamGroupSize);
    }

    /// <summary>A group per row of <paramref name="dim"/> values, striding over the rows beyond <see cref="StreamGroupLimit"/>.</summary>
    private KernelConfig RowGroups(int rows, int dim) => new(Math.Min(rows, StreamGroupLimit), GroupFor(dim, ReduceGroupSize));

    /// <summary>Lanes for a group that strides over <paramref name="work"/> items: no more than the work needs.</summary>
    private static int GroupFor(int work, int limit) => Math.Min(limit, CeilingPowerOfTwo(work));

    private static Span<T> Scratch<T>(ref T[] array, int length)
    {
        if (array.Length < length)
            array = new T[Math.Max(length, 2 * array.Length)];
        return array.AsSpan(0, length);
    }

    private void ThrowIfDisposed() => ObjectDisposedException.ThrowIf(_disposed, this);

    public void Dispose()
    {
        if (_disposed)
            return;
        _attentionRanges.Dispose();
        _ropeTables.Dispose();
        _nf4Table?.Dispose();
        _placeholder.Dispose();
        _accelerator.Dispose();
        _context.Dispose();
        _disposed = true;
    }

    public override string ToString() => Name;
}
