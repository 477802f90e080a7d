using System.Buffers;
using System.IO.Compression;
using System.Numerics.Tensors;
using PaliGemma.CpuOnly.Kernels;
using PaliGemma.CpuOnly.Tensors;

namespace PaliGemma.CpuOnly.Model.Tasks;

/// <summary>
/// The VQ-VAE mask decoder PaliGemma's <c>segment</c> task uses: 16 <c>&lt;segNNN&gt;</c> codes become a 64x64 mask
/// of logits (positive = inside the object). Weights come from Google's <c>vae-oid.npz</c> (PyTorch key names and layouts).
/// </summary>
/// <remarks>
/// The network follows big_vision's <c>segmentation.py</c>: codebook lookup into a 4x4xD grid, conv1x1 D->128 + relu,
/// two residual blocks (conv3x3, relu, conv3x3, relu, conv1x1, plus skip), four ConvTranspose2d(k4, s2, p1) + relu
/// (4->8->16->32->64 pixels, 128->128->64->32->16 channels), conv1x1 16->1.
/// Activations are kept channel-last ([pixels, channels], row-major), so every convolution is an im2col gather followed
/// by one <see cref="MatMul.Multiply(ReadOnlySpan{float}, int, in WeightMatrix, ReadOnlySpan{float}, Span{float})"/>.
/// Decode is thread-safe: the weights are read-only and each call rents its own scratch memory.
/// </remarks>
public sealed class MaskDecoder
{
    public const string DownloadHint =
        "The mask decoder is Google's big_vision vae-oid.npz (https://storage.googleapis.com/big_vision/paligemma/vae-oid.npz); download it and pass its path with --vae.";

    private const int CodebookSize = 128;
    private const int CodeCount = 16;
    private const int GridSize = 4;
    private const int MaskSize = 64;
    private const int Width = 128;

    private readonly float[] _embedding; // [CodebookSize, D]
    private readonly Convolution _input;
    private readonly ResidualBlock[] _residualBlocks;
    private readonly TransposedConvolution[] _upsamplers;
    private readonly Convolution _output;
    private readonly int _scratchLength;

    private MaskDecoder(float[] embedding, int embeddingDim, Convolution input, ResidualBlock[] residualBlocks,
        TransposedConvolution[] upsamplers, Convolution output)
    {
        _embedding = embedding;
        EmbeddingDim = embeddingDim;
        _input = input;
        _residualBlocks = residualBlocks;
        _upsamplers = upsamplers;
        _output = output;
        _scratchLength = ScratchLayout.TotalLength(upsamplers, embeddingDim);
    }

    /// <summary>D: the width of a codebook vector (the number of input channels of <c>decoder.0</c>).</summary>
    public int EmbeddingDim { get; }

    /// <summary>
    /// Reads the decoder from a <c>.npz</c> archive (stored or deflated entries). Only <c>_vq_vae._embedding</c> and
    /// <c>decoder.*</c> are read; other arrays (the encoder) are ignored.
    /// </summary>
    /// <exception cref="FileNotFoundException">The file does not exist (the message says where to get it).</exception>
    /// <exception cref="InvalidDataException">The file is not a readable npz, or an array is missing or has the wrong shape or dtype.</exception>
    public static MaskDecoder Load(string npzPath)
    {
        ArgumentException.ThrowIfNullOrEmpty(npzPath);
        if (!File.Exists(npzPath))
            throw new FileNotFoundException($"VQ-VAE mask decoder file '{npzPath}' does not exist. {DownloadHint}", npzPath);

        ZipArchive archive;
        try
        {
            archive = ZipFile.OpenRead(npzPath);
        }
        catch (InvalidDataException e)
        {
            throw new InvalidDataException($"'{npzPath}' is not a readable .npz (zip) archive: {e.Message}", e);
        }

        using (archive)
        {
            var arrays = new NpzArrays(archive, npzPath);

            NpyArray embeddingArray = arrays.Read("_vq_vae._embedding");
            if (embeddingArray.Shape is not [CodebookSize, > 0 and <= 1 << 16])
                throw arrays.WrongShape("_vq_vae._embedding", embeddingArray.Shape, $"[{CodebookSize}, D] with D > 0");
            int d = (int)embeddingArray.Shape[1];
            float[] embedding = arrays.ToFloat32("_vq_vae._embedding", embeddingArray);

            var input = Convolution.Load(arrays, "decoder.0", d, Width, 1);
            var residualBlocks = new[] { ResidualBlock.Load(arrays, "decoder.2"), ResidualBlock.Load(arrays, "decoder.3") };
            var upsamplers = new[]
            {
                TransposedConvolution.Load(arrays, "decoder.4", Width, Width),
                TransposedConvolution.Load(arrays, "decoder.6", Width, Width / 2),
                TransposedConvolution.Load(arrays, "decoder.8", Width / 2, Width / 4),
                TransposedConvolution.Load(arrays, "decoder.10", Width / 4, Width / 8),
            };
            var output = Convolution.Load(arrays, "decoder.12", Width / 8, 1, 1);
            return new MaskDecoder(embedding, d, input, residualBlocks, upsamplers, output);
        }
    }

    /// <summary>Decodes 16 codes (each 0..127, in reading order of the 4x4 grid) into a 64x64 mask, row-major with row = y.</summary>
    public float[] Decode(ReadOnlySpan<int> codes)
    {
        if (codes.Length != CodeCount)
            throw new ArgumentException($"a mask needs exactly {CodeCount} codes; got {codes.Length}", nameof(codes));
        for (int k = 0; k < codes.Length; k++)
        {
            if ((uint)codes[k] >= CodebookSize)
                throw new ArgumentException($"code {k} is {codes[k]}; codes must be in 0..{CodebookSize - 1}", nameof(codes));
        }

        var mask = new float[MaskSize * MaskSize];
        float[] rented = ArrayPool<float>.Shared.Rent(_scratchLength);
        try
        {
            var scratch = new ScratchLayout(rented, _upsamplers, EmbeddingDim);
            int d = EmbeddingDim;

            // Code k is grid cell (k / 4, k % 4); channel-last row-major makes that simply row k of the activation.
            Span<float> codeGrid = scratch.Codes;
            for (int k = 0; k < CodeCount; k++)
                _embedding.AsSpan(codes[k] * d, d).CopyTo(codeGrid.Slice(k * d, d));

            int size = GridSize;
            Span<float> x = scratch.PingPong(0, size * size * Width);
            _input.Forward(codeGrid, size, size, x, scratch.Columns);
            Relu(x);

            foreach (var block in _residualBlocks)
                block.Forward(x, size, scratch.BlockA, scratch.BlockB, scratch.Columns);

            int current = 0;
            foreach (var upsampler in _upsamplers)
            {
                Span<float> upsampled = scratch.PingPong(1 - current, 4 * size * size * upsampler.OutChannels);
                upsampler.Forward(x, size, upsampled, scratch.Columns, scratch.Parity);
                Relu(upsampled);
                size *= 2;
                current = 1 - current;
                x = upsampled;
            }

            _output.Forward(x, size, size, mask, scratch.Columns);
        }
        finally
        {
            ArrayPool<float>.Shared.Return(rented);
        }

        return mask;
    }

    private static void Relu(Span<float> x) => TensorPrimitives.Max(x, 0f, x);

    /// <summary>Slices one rented buffer into the activations and im2col space a decode needs.</summary>
    private readonly struct ScratchLayout
    {
        private readonly float[] _buffer;
        private readonly int _activation;
        private readonly int _columns;
        private readonly int _parity;
        private readonly int _codes;

        public ScratchLayout(float[] buffer, TransposedConvolution[] upsamplers, int embeddingDim)
        {
            _buffer = buffer;
            (_activation, _columns, _parity) = Sizes(upsamplers);
            _codes = CodeCount * embeddingDim;
        }

        // Order: ping-pong 0, ping-pong 1, residual temporaries A and B, codes, im2col columns, parity output.
        private int BlockAStart => 2 * _activation;
        private int BlockBStart => BlockAStart + BlockLength;
        private int CodesStart => BlockBStart + BlockLength;
        private int ColumnsStart => CodesStart + _codes;
        private int ParityStart => ColumnsStart + _columns;
        private static int BlockLength => GridSize * GridSize * Width;

        public Span<float> BlockA => _buffer.AsSpan(BlockAStart, BlockLength);
        public Span<float> BlockB => _buffer.AsSpan(BlockBStart, BlockLength);
        public Span<float> Codes => _buffer.AsSpan(CodesStart, _codes);
        public Span<float> Columns => _buffer.AsSpan(ColumnsStart, _columns);
        public Span<float> Parity => _buffer.AsSpan(ParityStart, _parity);

        public Span<float> PingPong(int index, int length) => _buffer.AsSpan(index * _activation, length);

        public static int TotalLength(TransposedConvolution[] upsamplers, int embeddingDim)
        {
            var (activation, columns, parity) = Sizes(upsamplers);
            return 2 * activation + 2 * BlockLength + CodeCount * embeddingDim + columns + parity;
        }

        private static (int Activation, int Columns, int Parity) Sizes(TransposedConvolution[] upsamplers)
        {
            int activation = GridSize * GridSize * Width;
            int columns = GridSize * GridSize * 9 * Width; // the residual blocks' 3x3 im2col
            int parity = 0;
            int size = GridSize;
            foreach (var upsampler in upsamplers)
            {
                activation = Math.Max(activation, 4 * size * size * upsampler.OutChannels);
                columns = Math.Max(columns, size * size * upsampler.ColumnsPerPixel);
                parity = Math.Max(parity, size * size * upsampler.OutChannels);
                size *= 2;
            }
            return (activation, columns, parity);
        }
    }

    /// <summary>Residual block: x += conv1x1(relu(conv3x3(relu(conv3x3(x))))), at the 4x4 grid size.</summary>
    private sealed class ResidualBlock(Convolution first, Convolution second, Convolution projection)
    {
        public static ResidualBlock Load(NpzArrays arrays, string prefix) => new(
            Convolution.Load(arrays, prefix + ".net.0", Width, Width, 3),
            Convolution.Load(arrays, prefix + ".net.2", Width, Width, 3),
            Convolution.Load(arrays, prefix + ".net.4", Width, Width, 1));

        public void Forward(Span<float> x, int size, Span<float> a, Span<float> b, Span<float> columns)
        {
            int length = size * size * Width;
            a = a[..length];
            b = b[..length];
            first.Forward(x, size, size, a, columns);
            Relu(a);
            second.Forward(a, size, size, b, columns);
            Relu(b);
            projection.Forward(b, size, size, a, columns);
            TensorPrimitives.Add(x[..length], a, x[..length]);
        }
    }

    /// <summary>
    /// A stride-1 convolution with "same" zero padding (k / 2) and odd kernel size k. The PyTorch weight [out, in, k, k]
    /// is rearranged once to [out, k, k, in] so an im2col row is k*k contiguous runs of a channel-last input.
    /// </summary>
    private sealed unsafe class Convolution
    {
        private readonly float[] _weight; // pinned: WeightMatrix keeps a raw pointer into it
        private readonly float[] _bias;
        private readonly WeightMatrix _matrix;
        private readonly int _inChannels;
        private readonly int _kernelSize;

        private Convolution(float[] weight, float[] bias, int inChannels, int outChannels, int kernelSize)
        {
            _weight = weight;
            _bias = bias;
            _inChannels = inChannels;
            _kernelSize = kernelSize;
            _matrix = new WeightMatrix(PinnedArrays.Pointer(weight), DType.F32, outChannels, kernelSize * kernelSize * inChannels);
        }

        public static Convolution Load(NpzArrays arrays, string prefix, int inChannels, int outChannels, int kernelSize)
        {
            float[] torchWeight = arrays.ReadFloat32(prefix + ".weight", [outChannels, inChannels, kernelSize, kernelSize]);
            float[] bias = arrays.ReadFloat32(prefix + ".bias", [outChannels]);

            int taps = kernelSize * kernelSize;
            float[] weight = PinnedArrays.Allocate(torchWeight.Length);
            for (int o = 0; o < outChannels; o++)
                for (int i = 0; i < inChannels; i++)
                    for (int t = 0; t < taps; t++)
                        weight[(o * taps + t) * inChannels + i] = torchWeight[(o * inChannels + i) * taps + t];
            return new Convolution(weight, bias, inChannels, outChannels, kernelSize);
        }

        /// <param name="input">[height * width, in] channel-last.</param>
        /// <param name="output">Receives [height * width, out] channel-last.</param>
        /// <param name="columns">im2col space of at least height * width * k * k * in floats (unused for 1x1).</param>
        public void Forward(ReadOnlySpan<float> input, int height, int width, Span<float> output, Span<float> columns)
        {
            int pixels = height * width;
            if (_kernelSize == 1)
            {
                MatMul.Multiply(input, pixels, _matrix, _bias, output);
                return;
            }

            int c = _inChannels;
            int pad = _kernelSize / 2;
            int rowLength = _kernelSize * _kernelSize * c;
            for (int y = 0; y < height; y++)
            {
                for (int x = 0; x < width; x++)
                {
                    Span<float> row = columns.Slice((y * width + x) * rowLength, rowLength);
                    int tap = 0;
                    for (int ky = 0; ky < _kernelSize; ky++)
                    {
                        int sy = y + ky - pad;
                        for (int kx = 0; kx < _kernelSize; kx++, tap++)
                        {
                            int sx = x + kx - pad;
                            Span<float> destination = row.Slice(tap * c, c);
                            if ((uint)sy < (uint)height && (uint)sx < (uint)width)
                                input.Slice((sy * width + sx) * c, c).CopyTo(destination);
                            else
                                destination.Clear();
                        }
                    }
                }
            }
            MatMul.Multiply(columns, pixels, _matrix, _bias, output);
        }
    }

    /// <summary>
    /// PyTorch ConvTranspose2d(kernel 4, stride 2, padding 1), weight [in, out, 4, 4]: output pixel o receives input
    /// pixel i through kernel tap k where o = 2i - 1 + k. Instead of correlating a zero-dilated input (three quarters
    /// zeros), each output parity class (oy % 2, ox % 2) is computed as its own small convolution over the undilated
    /// input: along one axis, even outputs 2m read inputs m-1 (tap 3) and m (tap 1); odd outputs 2m+1 read m (tap 2)
    /// and m+1 (tap 0). So each parity is a 2x2-tap im2col [pixels, 2*2*in] times a weight [out, 2*2*in] built once at
    /// load; the result is then scattered to every other row and column of the doubled output.
    /// </summary>
    private sealed unsafe class TransposedConvolution
    {
        private const int Kernel = 4;
        private const int TapsPerAxis = 2;

        private readonly float[][] _parityWeights; // [ry * 2 + rx] -> pinned [out, ty, tx, in]; the matrices point into them
        private readonly WeightMatrix[] _parityMatrices;
        private readonly float[] _bias;
        private readonly int _inChannels;

        private TransposedConvolution(float[][] parityWeights, float[] bias, int inChannels, int outChannels)
        {
            _parityWeights = parityWeights;
            _bias = bias;
            _inChannels = inChannels;
            OutChannels = outChannels;
            _parityMatrices = new WeightMatrix[parityWeights.Length];
            for (int p = 0; p < parityWeights.Length; p++)
                _parityMatrices[p] = new WeightMatrix(PinnedArrays.Pointer(parityWeights[p]), DType.F32, outChannels, ColumnsPerPixel);
        }

        public int OutChannels { get; }

        public int ColumnsPerPixel => TapsPerAxis * TapsPerAxis * _inChannels;

        /// <summary>Input offset of tap t (0 or 1) for output parity r along one axis.</summary>
        private static int InputOffset(int parity, int tap) => tap - 1 + parity;

        /// <summary>Kernel index of tap t (0 or 1) for output parity r along one axis.</summary>
        private static int KernelIndex(int parity, int tap) => Kernel - 1 - 2 * tap - parity;

        public static TransposedConvolution Load(NpzArrays arrays, string prefix, int inChannels, int outChannels)
        {
            float[] torchWeight = arrays.ReadFloat32(prefix + ".weight", [inChannels, outChannels, Kernel, Kernel]);
            float[] bias = arrays.ReadFloat32(prefix + ".bias", [outChannels]);

            int columns = TapsPerAxis * TapsPerAxis * inChannels;
            var parityWeights = new float[4][];
            for (int ry = 0; ry < 2; ry++)
            {
                for (int rx = 0; rx < 2; rx++)
                {
                    float[] weight = PinnedArrays.Allocate(outChannels * columns);
                    for (int o = 0; o < outChannels; o++)
                        for (int ty = 0; ty < TapsPerAxis; ty++)
                            for (int tx = 0; tx < TapsPerAxis; tx++)
                                for (int i = 0; i < inChannels; i++)
                                {
                                    int ky = KernelIndex(ry, ty), kx = KernelIndex(rx, tx);
                                    weight[o * columns + (ty * TapsPerAxis + tx) * inChannels + i] =
                                        torchWeight[((i * outChannels + o) * Kernel + ky) * Kernel + kx];
                                }
                    parityWeights[ry * 2 + rx] = weight;
                }
            }
            return new TransposedConvolution(parityWeights, bias, inChannels, outChannels);
        }

        /// <param name="input">[size * size, in] channel-last.</param>
        /// <param name="output">Receives [2 size * 2 size, out] channel-last.</param>
        /// <param name="columns">At least size * size * <see cref="ColumnsPerPixel"/> floats.</param>
        /// <param name="parityOutput">At least size * size * out floats.</param>
        public void Forward(ReadOnlySpan<float> input, int size, Span<float> output, Span<float> columns, Span<float> parityOutput)
        {
            int c = _inChannels;
            int n = OutChannels;
            int pixels = size * size;
            int rowLength = ColumnsPerPixel;
            int outputSize = 2 * size;
            for (int ry = 0; ry < 2; ry++)
            {
                for (int rx = 0; rx < 2; rx++)
                {
                    for (int y = 0; y < size; y++)
                    {
                        for (int x = 0; x < size; x++)
                        {
                            Span<float> row = columns.Slice((y * size + x) * rowLength, rowLength);
                            for (int ty = 0; ty < TapsPerAxis; ty++)
                            {
                                int sy = y + InputOffset(ry, ty);
                                for (int tx = 0; tx < TapsPerAxis; tx++)
                                {
                                    int sx = x + InputOffset(rx, tx);
                                    Span<float> destination = row.Slice((ty * TapsPerAxis + tx) * c, c);
                                    if ((uint)sy < (uint)size && (uint)sx < (uint)size)
                                        input.Slice((sy * size + sx) * c, c).CopyTo(destination);
                                    else
                                        destination.Clear();
                                }
                            }
                        }
                    }

                    MatMul.Multiply(columns, pixels, _parityMatrices[ry * 2 + rx], _bias, parityOutput);

                    for (int y = 0; y < size; y++)
                    {
                        for (int x = 0; x < size; x++)
                        {
                            parityOutput.Slice((y * size + x) * n, n)
                                .CopyTo(output.Slice(((2 * y + ry) * outputSize + 2 * x + rx) * n, n));
                        }
                    }
                }
            }
        }
    }

    /// <summary>Arrays on the pinned object heap never move, so a pointer taken once stays valid while the array lives.</summary>
    private static unsafe class PinnedArrays
    {
        public static float[] Allocate(int length) => GC.AllocateUninitializedArray<float>(length, pinned: true);

        public static float* Pointer(float[] pinnedArray)
        {
            fixed (float* pointer = pinnedArray)
                return pointer;
        }
    }

    /// <summary>Looks up <c>key.npy</c> entries of an npz and checks them; errors name the file and the key.</summary>
    private sealed class NpzArrays(ZipArchive archive, string path)
    {
        public NpyArray Read(string key)
        {
            ZipArchiveEntry entry = archive.GetEntry(key + ".npy")
                ?? throw new InvalidDataException($"'{path}' has no array '{key}' (entry '{key}.npy'); it is not a complete VQ-VAE mask decoder file. {DownloadHint}");
            try
            {
                using Stream stream = entry.Open();
                return Npy.Read(stream, $"'{path}' array '{key}'");
            }
            catch (InvalidDataException e) when (!e.Message.Contains(key, StringComparison.Ordinal))
            {
                throw new InvalidDataException($"'{path}' array '{key}': {e.Message}", e);
            }
        }

        public float[] ReadFloat32(string key, ReadOnlySpan<long> expectedShape)
        {
            NpyArray array = Read(key);
            if (!array.Shape.AsSpan().SequenceEqual(expectedShape))
                throw WrongShape(key, array.Shape, TensorData.FormatShape(expectedShape));
            return ToFloat32(key, array);
        }

        public float[] ToFloat32(string key, NpyArray array)
        {
            try
            {
                return array.ToFloat32();
            }
            catch (InvalidOperationException e)
            {
                throw new InvalidDataException($"'{path}' array '{key}' must be float32 or float64: {e.Message}", e);
            }
        }

        public InvalidDataException WrongShape(string key, long[] actual, string expected) =>
            new($"'{path}' array '{key}' has shape {TensorData.FormatShape(actual)}; the mask decoder needs {expected}");
    }
}
